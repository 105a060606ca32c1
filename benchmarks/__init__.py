"""Benchmarks of per-example gradients, goodfellow against its peers: ``python -m benchmarks.run``.

* :mod:`benchmarks.methods`: the configurations and the contenders, each a timed step plus a check
  of what it computed against the naive per-example loop;
* :mod:`benchmarks.run`: the command line, the timing loop, the two allocator settings;
* :mod:`benchmarks.report`: the figures and tables of the docs' Benchmarks page, made from
  ``results.json``;
* :mod:`benchmarks.profiling`: ``torch.profiler`` tables of where each method spends its time.
"""
