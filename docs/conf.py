"""Sphinx configuration of the goodfellow site.

The build needs no network: MathJax is bundled (sphinx-mathjax-offline), pandoc comes from
pypandoc-binary, there is no intersphinx, and no page loads anything from a CDN. It is run as
``python -m sphinx -W --keep-going -n -b html docs docs/_build/html`` (``make docs``), so every
warning, including an unresolved cross-reference, fails the build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import goodfellow  # noqa: E402

# -- Project -------------------------------------------------------------------------------------

project = "goodfellow"
author = "The goodfellow developers"
copyright = "2026, The goodfellow developers"
release = goodfellow.__version__
version = ".".join(release.split(".")[:2])

# Placeholder: the public repository. Every link to it on the site comes from this one setting:
# the Colab and Binder links, the sidebar's repository, issue tracker, licence and citation links,
# and the install commands of the .rst pages, which write @REPOSITORY_URL@ (replaced when the
# page is read). The notebooks, which must work outside the site, spell it out in their first
# code cell; tests/test_notebooks.py checks that they agree with this setting. Change it (and
# the Documentation URL in pyproject.toml) when the project is published under another name.
REPOSITORY_URL = "https://github.com/goodfellow-dev/goodfellow"
REPOSITORY_BRANCH = "main"
ISSUES_URL = f"{REPOSITORY_URL}/issues"

# -- pandoc (nbsphinx converts notebook markdown with it) ------------------------------------------

# pypandoc-binary ships a pandoc executable; putting its folder first on PATH means the build
# needs no system pandoc.
try:
    import pypandoc
except ImportError:  # a system pandoc on PATH still works
    pass
else:
    try:
        _pandoc_dir = os.path.dirname(pypandoc.get_pandoc_path())
    except OSError:
        pass
    else:
        os.environ["PATH"] = _pandoc_dir + os.pathsep + os.environ.get("PATH", "")

# -- Tutorials: tutorials/*.ipynb are the sources, docs/tutorials/ a build-time copy --------

TUTORIALS_SOURCE = ROOT / "tutorials"
TUTORIALS_COPY = DOCS / "tutorials"  # gitignored
_SKIP = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", ".*")


def _copy_tutorials() -> None:
    """Mirror tutorials/ into docs/tutorials/ so the notebooks live inside the Sphinx source tree.

    Notebooks deleted or renamed in tutorials/ disappear from the copy too, so a stale page can't
    linger in the site.
    """
    if TUTORIALS_COPY.exists():
        shutil.rmtree(TUTORIALS_COPY)
    if TUTORIALS_SOURCE.is_dir():
        shutil.copytree(TUTORIALS_SOURCE, TUTORIALS_COPY, ignore=_SKIP)
    else:
        TUTORIALS_COPY.mkdir()


_copy_tutorials()

# -- Tutorials: the list, the lesson plan and the handouts come from the notebooks ---------------

# Each notebook carries its place in the course in its metadata, under this key (see
# docs/teachers.rst, "Adding a tutorial"); a new notebook in tutorials/ appears on the Tutorials
# page, in the lesson plan and in the handouts without any edit of the .rst pages.
TUTORIAL_METADATA_KEY = "goodfellow"
TUTORIAL_FIELDS = {
    "part": "the heading it is listed under on the Tutorials page",
    "summary": "one or two sentences for the Tutorials page",
    "minutes": "the time it takes in class, in minutes",
    "level": "introductory, intermediate or advanced",
    "session": "the session of the lesson plan it belongs to (1, 2, ...)",
    "aims": "what students can do afterwards (lesson plan)",
    "activity": "a suggested activity for the session, with timings (lesson plan)",
}
LEVELS = ("introductory", "intermediate", "advanced")
SOLUTION_PREFIX = "<details><summary>Solution</summary>"
HANDOUT_NAME = "goodfellow-handouts.zip"


def _tutorials() -> list[dict]:
    """Title, file and course metadata of every notebook in tutorials/, in file order."""
    import re

    import nbformat

    tutorials = []
    for path in sorted(TUTORIALS_SOURCE.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        first = notebook.cells[0].source if notebook.cells else ""
        match = re.match(r"# (\d+)\. (.+)", first)
        title = match.group(2).strip() if match else path.stem
        meta = dict(notebook.metadata.get(TUTORIAL_METADATA_KEY, {}))
        missing = [key for key in TUTORIAL_FIELDS if key not in meta]
        tutorials.append(
            {"path": path, "doc": f"tutorials/{path.stem}", "title": title, "missing": missing,
             **meta}
        )
    return tutorials


def _indent(text: str, spaces: int) -> str:
    return "\n".join((" " * spaces + line) if line else "" for line in text.splitlines())


def _when(tutorial: dict) -> str:
    minutes, level = tutorial.get("minutes"), tutorial.get("level")
    parts = [str(level).capitalize() if level else ""]
    parts.append(f"about {minutes} minutes" if minutes else "")
    return ", ".join(part for part in parts if part)


def _write_tutorial_pages(tutorials: list[dict]) -> None:
    """The Tutorials page's list and the teachers page's lesson plan, from the metadata."""
    lines, part = [], None
    for tutorial in tutorials:
        if tutorial.get("part", "Further tutorials") != part:
            part = tutorial.get("part", "Further tutorials")
            lines += ["", part, "-" * len(part), ""]
        lines.append(f":doc:`{tutorial['doc']}`")
        body = (f"*{_when(tutorial)}.* " if _when(tutorial) else "") + tutorial.get("summary", "")
        lines += [_indent(body.strip(), 4), ""]
    (DOCS / "tutorial_list.generated.txt").write_text("\n".join(lines) + "\n")

    sessions: dict[int, list[dict]] = {}
    for tutorial in tutorials:
        sessions.setdefault(int(tutorial.get("session", 0) or 0), []).append(tutorial)
    rows = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 10 30 60",
        "   :class: lesson-plan",
        "",
        "   * - Session",
        "     - Tutorials and time",
        "     - Aims and suggested activity",
    ]
    # Sessions in order; tutorials not yet planned (no metadata) last.
    for session in sorted(sessions, key=lambda number: (number == 0, number)):
        members = sessions[session]
        who = "; ".join(
            f":doc:`{t['doc']}` ({t['minutes']} min)" if t.get("minutes") else f":doc:`{t['doc']}`"
            for t in members
        )
        total = sum(int(t.get("minutes", 0) or 0) for t in members)
        texts = []
        for t in members:
            number = int(t["path"].name[:2])
            if t.get("aims") or t.get("activity"):
                texts.append(
                    f"**{number}.** {t.get('aims', '')} *Activity:* {t.get('activity', '')}"
                )
            else:
                texts.append(f"**{number}.** Not planned yet.")
        rows += [
            f"   * - {session if session else '(later)'}",
            f"     - {who}{f'; {total} min in all' if len(members) > 1 and total else ''}",
            f"     - {' '.join(texts)}",
        ]
    (DOCS / "lesson_plan.generated.txt").write_text("\n".join(rows) + "\n")


def _strip_solutions(path: Path):
    """The notebook at ``path`` without its solution cells (the handout a student gets)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    notebook.cells = [
        cell
        for cell in notebook.cells
        if not (cell.cell_type == "markdown" and cell.source.lstrip().startswith(SOLUTION_PREFIX))
    ]
    return notebook


def _write_handouts(outdir: Path) -> Path:
    """One zip of every tutorial without its solutions, into the built site."""
    import zipfile

    import nbformat

    target = outdir / HANDOUT_NAME
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for tutorial in TUTORIALS:
            archive.writestr(
                f"goodfellow-handouts/{tutorial['path'].name}",
                nbformat.writes(_strip_solutions(tutorial["path"])),
            )
    return target


TUTORIALS = _tutorials()
_write_tutorial_pages(TUTORIALS)

# -- The index's "what is supported" box, from the library's registered layer rules -------------


def _summary_line(obj: object) -> str:
    """The first line of a docstring, its cross-references as plain code.

    The references are written relative to their own module, which a generated table outside
    that module cannot resolve.
    """
    import re

    doc = (getattr(obj, "__doc__", None) or "").strip()
    line = doc.splitlines()[0].strip() if doc else ""
    role = re.compile(r":(?:py:)?\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
    return role.sub(lambda match: f"``{match.group(1).split('.')[-1]}``", line)


def _supported_layers() -> list[tuple[str, str]]:
    """(layer type, what its rule does) for every layer kind the hooks know.

    ``goodfellow.layers.registered_rules()`` maps module types to rule objects; before it exists
    the one supported layer is ``nn.Linear``.
    """
    registered = getattr(goodfellow.layers, "registered_rules", None)
    if registered is None:
        return [("torch.nn.Linear", "Per-example gradients as outer products of input and output "
                 "gradient.")]
    layers = []
    for module_type, rule in registered().items():
        name = f"{module_type.__module__}.{module_type.__qualname__}"
        name = name.replace("torch.nn.modules.linear.", "torch.nn.")
        if name.startswith("torch.nn.modules."):
            name = "torch.nn." + module_type.__qualname__
        summary = _summary_line(rule if isinstance(rule, type) else type(rule))
        layers.append((name, summary))
    return sorted(layers)


def _write_supported_box() -> None:
    import re

    # Layer types whose rules have the same summary share one line.
    grouped: dict[str, list[str]] = {}
    for name, summary in _supported_layers():
        summary = re.sub(r"^``[^`]+``:\s*", "", summary)  # the summary's own list of types
        grouped.setdefault(summary, []).append(name)
    layers = "\n".join(
        "   * " + ", ".join(f"``{name}``" for name in names) + (f": {summary}" if summary else "")
        for summary, names in grouped.items()
    )
    text = f"""\
.. admonition:: What goodfellow supports, and what it does not
   :class: supported-box

   **Layers with per-example gradients** (the hooks of
   :class:`~goodfellow.PerExampleGradients`; :func:`~goodfellow.goodfellow_backprop` takes the
   :class:`~goodfellow.MLP`):

{layers}
   * any other module with trainable parameters of its own (a custom layer, a bare
     ``nn.Parameter`` a module holds): the fallback rule, ``torch.func`` on that module alone,
     which trusts the module to treat its examples independently
     (:mod:`goodfellow.layers.fallback`).

   Layers without parameters (activations, dropout, pooling, reshapes) may sit anywhere in
   between. Several forwards of the model before one backward are one batch: example
   :math:`i`'s gradient adds up its part from each (right for two views of every example; for
   two batches, run a backward after each).

   **Losses**: any loss that is the sum or the mean over the batch of one term per example
   (``reduction="sum"`` or ``"mean"``: cross-entropy, squared error, ...), declared as
   ``loss_reduction``.

   **Not supported**: models that mix examples in the forward or the loss (BatchNorm in
   training mode is refused; a batch statistic elsewhere or a contrastive loss cannot be told
   apart, and :func:`~goodfellow.check_per_example_gradients` compares the recorder with
   ``torch.func`` on your model), inputs whose first dimension is not the batch, and weighted
   or ``ignore_index`` means (not a constant times the sum). ``torch.func``
   (:func:`~goodfellow.torch_func_per_example_grads`) handles any functional model.
"""
    (DOCS / "supported.generated.txt").write_text(text)


_write_supported_box()

# -- The API page's summary table: every public name of the documented modules ------------------


def _write_api_summary() -> None:
    """A table of every public name, grouped by module in the order of api.rst."""
    import importlib
    import inspect
    import re

    modules = re.findall(r"^\.\. automodule:: (\S+)", (DOCS / "api.rst").read_text(), re.M)
    rows = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 35 65",
        "   :class: api-summary",
        "",
        "   * - Name",
        "     - What it is",
    ]
    for module_name in modules:
        module = importlib.import_module(module_name)
        names = [
            name for name in getattr(module, "__all__", [])
            if getattr(getattr(module, name), "__module__", None) == module_name
        ]
        for name in names:
            obj = getattr(module, name)
            role = "class" if inspect.isclass(obj) else "func" if callable(obj) else "data"
            rows += [
                f"   * - :py:{role}:`~{module_name}.{name}`",
                f"     - {_summary_line(obj) or ' '}",
            ]
    (DOCS / "api_summary.generated.txt").write_text("\n".join(rows) + "\n")


_write_api_summary()

# -- Benchmarks: the GPU section shows committed GPU results, if there are any ---------------

# Beside benchmarks.rst, so that the paths inside it mean the same to Sphinx and to docutils.
GPU_SECTION = DOCS / "gpu_results.generated.txt"  # gitignored


def _write_gpu_section() -> None:
    """Write the Benchmarks page's GPU section from ``benchmarks/results_cuda.json``."""
    import json

    from benchmarks.report import gpu_section

    results_file = ROOT / "benchmarks" / "results_cuda.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    GPU_SECTION.write_text(gpu_section(results))


_write_gpu_section()

# The Benchmarks page's tables, figures and the numbers its prose quotes, all from the committed
# CPU results: a number in the text can't disagree with the table.
BENCH_RESULTS = ROOT / "benchmarks" / "results.json"
BENCH_FIGURES = DOCS / "_build" / "figures"  # written at every build, never committed
METHOD_ORDER = [
    "plain_backward", "write_floor", "naive_loop", "torch_func_vmap", "opacus", "backpack",
    "goodfellow_backprop", "goodfellow_backprop_fresh", "hooks", "norms_only", "clipped_mean",
    "opacus_ghost_clipping",
]
# One colour per method, the same in every figure of the site that shows methods.
METHOD_COLORS = {
    "plain_backward": "#4d4d4d", "write_floor": "#a6a6a6", "naive_loop": "#b07d48",
    "torch_func_vmap": "#9c5fa0", "opacus": "#d9534f", "backpack": "#5b8fd6",
    "goodfellow_backprop": "#1b7a3a", "goodfellow_backprop_fresh": "#7cc48a",
    "hooks": "#2a9d8f", "norms_only": "#e08a1e", "clipped_mean": "#b35806",
    "opacus_ghost_clipping": "#f2a3a3",
}


def _bench_records() -> list[dict]:
    import json

    return json.loads(BENCH_RESULTS.read_text())["records"] if BENCH_RESULTS.exists() else []


def _bench(records, config, method, allocator, key="median_s"):
    for record in records:
        if (record["config"], record["method"], record.get("allocator", "default")) == (
            config, method, allocator
        ):
            return record.get(key)
    return None


def _ms(value) -> str:
    if value is None:
        return "n/a"
    return f"{1e3 * value:.0f}" if value >= 0.01 else f"{1e3 * value:.1f}"


def _write_bench_numbers(records: list[dict]) -> None:
    """Substitutions (|name|) for every measured number the Benchmarks prose quotes."""
    import json

    big = "mnist-mlp/n512"
    numbers = {
        "big_config": big,
        "backpack_default_ms": _ms(_bench(records, big, "backpack", "default")),
        "backpack_thp_ms": _ms(_bench(records, big, "backpack", "thp")),
        "func_default_ms": _ms(_bench(records, big, "torch_func_vmap", "default")),
        "func_thp_ms": _ms(_bench(records, big, "torch_func_vmap", "thp")),
        "kept_ms": _ms(_bench(records, big, "goodfellow_backprop", "default")),
        "fresh_ms": _ms(_bench(records, big, "goodfellow_backprop_fresh", "default")),
        "write_floor_ms": _ms(_bench(records, big, "write_floor", "default")),
        "plain_ms": _ms(_bench(records, big, "plain_backward", "default")),
    }
    faults = _bench(records, big, "goodfellow_backprop_fresh", "default", "minor_faults_per_step")
    numbers["fresh_faults"] = "n/a" if faults is None else f"{faults:,.0f}"
    per_example = _bench(records, big, "plain_backward", "default", "per_example_mb")
    numbers["big_mib"] = "n/a" if per_example is None else f"{per_example:.0f}"
    meta = json.loads(BENCH_RESULTS.read_text()).get("meta", {}) if BENCH_RESULTS.exists() else {}
    versions = meta.get("versions", {})
    numbers["bench_machine"] = (
        f"{meta.get('cpu_count', '?')} CPU cores ({meta.get('device_name', 'unknown processor')})"
    )
    numbers["bench_date"] = meta.get("date", "n/a")
    numbers["bench_threads"] = str(meta.get("threads", "n/a"))
    numbers["bench_torch"] = versions.get("torch", "n/a")
    numbers["bench_opacus"] = versions.get("opacus", "n/a")
    numbers["bench_backpack"] = versions.get("backpack-for-pytorch", "n/a")
    text = "\n".join(f".. |{key}| replace:: {value}" for key, value in numbers.items())
    (DOCS / "benchmark_numbers.generated.txt").write_text(text + "\n")


def _measured_on(results: dict) -> str:
    """``"AMD EPYC, 2026-12-03"``: the machine and the day of a results file's run."""
    meta = results.get("meta", {})
    return f"{meta.get('device_name', 'unknown machine')}, {meta.get('date', '?')[:10]}"


def _write_extra_bench_tables() -> None:
    """The DP-SGD step, the data-parallel step and the memory sweep, from their results files."""
    import json

    out = []
    dpsgd_file = ROOT / "benchmarks" / "results_dpsgd.json"
    if dpsgd_file.exists():
        dpsgd = json.loads(dpsgd_file.read_text())
        for config in dict.fromkeys(r["config"] for r in dpsgd["records"]):
            rows = [r for r in dpsgd["records"] if r["config"] == config]
            out += [
                f".. list-table:: One DP-SGD step (clip, noise, SGD), {config} "
                f"({_measured_on(dpsgd)})",
                "   :header-rows: 1",
                "   :widths: 24 21 55",  # the method names fit on one line, "median" too
                "",
                "   * - method",
                "     - median ms",
                "     - what it runs",
            ]
            for r in rows:
                timed = f"{1e3 * r['median_s']:.1f}" if "median_s" in r else "skipped"
                what = r.get("description") or r.get("skipped", "")
                out += [f"   * - ``{r['method']}``", f"     - {timed}", f"     - {what}"]
            out.append("")
        for target in dpsgd.get("targets", []):
            verdict = "met" if target["met"] else "missed"
            out.append(
                f"* ``{target['config']}``: ``{target['goodfellow_method']}`` is "
                f"{target['speedup']:.2f} times as fast as ``{target['fastest_opacus']}`` "
                f"(target {target['required_speedup']}: {verdict})."
            )
        out.append("")
    (DOCS / "benchmark_dpsgd.generated.txt").write_text("\n".join(out) + "\n")
    out = []
    ddp_file = ROOT / "benchmarks" / "results_ddp.json"
    if ddp_file.exists():
        ddp = json.loads(ddp_file.read_text())
        config = ddp["records"][0]["config"]
        out += [
            f".. list-table:: One DDP step on 2 gloo ranks, {config} ({_measured_on(ddp)})",
            "   :header-rows: 1",
            "",
            "   * - method",
            "     - median ms",
            "     - / ddp_plain",
            "     - bytes sent per rank",
        ]
        for r in ddp["records"]:
            out += [
                f"   * - ``{r['method']}``",
                f"     - {1e3 * r['median_s']:.1f}",
                f"     - {r['ratio_to_ddp_plain']:.2f}",
                f"     - {r['bytes_per_step']:,}",
            ]
        out.append("")
        for target in ddp.get("targets", []):
            verdict = "met" if target["met"] else "missed"
            out.append(
                f"* ``{target['method']}``: {target['ratio']:.2f} times a plain DDP step "
                f"(target {target['target']}: {verdict})."
            )
        out.append("")
    (DOCS / "benchmark_ddp.generated.txt").write_text("\n".join(out) + "\n")
    out = []
    memory_file = ROOT / "benchmarks" / "results_memory.json"
    if memory_file.exists():
        from benchmarks.memory import extra_cell
        records = json.loads(memory_file.read_text())["records"]
        for shape in dict.fromkeys((r["T"], r["n"]) for r in records):
            out += [
                f".. list-table:: Peak memory above ``plain_backward``'s, tiny-lm/T{shape[0]}-n"
                f"{shape[1]} by width (MiB, share of n * P)",
                "   :header-rows: 1",
                "",
                "   * - d",
                "     - n * P",
                "     - ``norms_only``",
                "     - ``clipped_mean``",
            ]
            for r in (r for r in records if (r["T"], r["n"]) == shape):
                plain = r["plain_backward_peak_mb"]
                extras = [r[f"{m}_peak_mb"] - plain for m in ("norms_only", "clipped_mean")]
                out += [
                    f"   * - {r['d']}",
                    f"     - {r['n_P_mb']:.1f}",
                    *(f"     - {extra_cell(e, r['n_P_mb'])}" for e in extras),
                ]
            out.append("")
    (DOCS / "benchmark_memory.generated.txt").write_text("\n".join(out) + "\n")


_write_extra_bench_tables()


def _write_bench_tables(records: list[dict]) -> None:
    """Per allocator setting, one table per configuration: narrow enough for a phone."""
    configs = list(dict.fromkeys(record["config"] for record in records))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in records)]
    out = []
    for allocator, title in (("default", "Default allocator"), ("thp", "THP_MEM_ALLOC_ENABLE=1")):
        if not any(r.get("allocator", "default") == allocator for r in records):
            continue
        out += [f".. rubric:: {title}", ""]
        for config in configs:
            out += [
                f".. list-table:: {config}, {title.lower() if allocator == 'default' else title}",
                "   :header-rows: 1",
                "   :class: bench-table",
                "",
                "   * - Method",
                "     - ms",
                "     - × plain",
                "     - faults",
                "     - peak MiB",
            ]
            for method in methods:
                median = _bench(records, config, method, allocator)
                if median is None:
                    continue
                ratio = _bench(records, config, method, allocator, "ratio_to_plain_backward")
                faults = _bench(records, config, method, allocator, "minor_faults_per_step")
                peak = _bench(records, config, method, allocator, "peak_mem_mb")
                out += [
                    f"   * - ``{method}``",
                    f"     - {1e3 * median:,.1f}",
                    f"     - {ratio:.2f}" if ratio is not None else "     - n/a",
                    f"     - {faults:,.0f}" if faults is not None else "     - n/a",
                    f"     - {peak:,.0f}" if peak is not None else "     - n/a",
                ]
            out.append("")
    (DOCS / "benchmark_tables.generated.txt").write_text("\n".join(out) + "\n")


def _draw_bench_figures(records: list[dict]) -> None:
    """Step time relative to plain_backward, one figure per allocator, readable at page width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    BENCH_FIGURES.mkdir(parents=True, exist_ok=True)
    configs = list(dict.fromkeys(record["config"] for record in records))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in records)]
    for allocator in ("default", "thp"):
        columns = 2
        rows = (len(configs) + columns - 1) // columns
        fig, axes = plt.subplots(
            rows, columns, figsize=(9.6, 3.3 * rows), sharex=True, squeeze=False,
            layout="constrained",
        )
        every_ratio = [
            _bench(records, config, m, allocator, "ratio_to_plain_backward")
            for config in configs
            for m in methods
            if _bench(records, config, m, allocator) is not None
        ]
        lowest = min(every_ratio, default=1.0)  # the write floor can sit far below 1
        for index, ax in enumerate(axes.flat):
            if index >= len(configs):
                ax.axis("off")
                continue
            config = configs[index]
            shown = [m for m in methods if _bench(records, config, m, allocator) is not None]
            ratios = [
                _bench(records, config, m, allocator, "ratio_to_plain_backward") for m in shown
            ]
            times = [_bench(records, config, m, allocator) for m in shown]
            positions = range(len(shown))
            ax.barh(positions, ratios, color=[METHOD_COLORS.get(m, "C0") for m in shown])
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8)
            for y, ratio, seconds in zip(positions, ratios, times):
                ax.text(ratio * 1.1, y, f"{1e3 * seconds:.1f} ms", va="center", fontsize=9)
            # every panel names its own rows: the CNNs and language models run fewer methods
            # than the MLPs, so a neighbour's labels would not line up
            ax.set_yticks(list(positions), shown, fontsize=9)
            ax.invert_yaxis()
            ax.set_title(config, fontsize=11)
            ax.set_xlim(min(0.3, lowest / 1.5), 3000)
            if index >= len(configs) - columns:
                ax.set_xlabel("time / plain_backward (log scale)", fontsize=9)
        fig.savefig(BENCH_FIGURES / f"cpu_{allocator}.png", dpi=150)
        plt.close(fig)


_BENCH_RECORDS = _bench_records()
_write_bench_numbers(_BENCH_RECORDS)
_write_bench_tables(_BENCH_RECORDS)
_draw_bench_figures(_BENCH_RECORDS)

# -- General -------------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "nbsphinx",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]

exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "tutorials/**/*.rst",
    "tutorials/**/*.md",
    "*.generated.txt",
]
nitpicky = True
# Types that appear in signatures and have no page in this offline build (there is no
# intersphinx): they are shown as plain text instead of failing the nitpicky build.
nitpick_ignore_regex = [
    ("py:class", r"torch(\..*)?"),
    ("py:class", r"Tensor"),
    ("py:class", r"nn\..*"),
    ("py:class", r"numpy(\..*)?"),
    ("py:class", r"np\..*"),
    ("py:class", r"collections\.abc\..*"),
    ("py:class", r"typing\..*"),
    ("py:class", r"Sequence|Callable|Iterable|Iterator|Mapping|Any"),
    ("py:class", r"LossFunction"),
]

# -- autodoc / napoleon: Google-style docstrings --------------------------------------------------

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True


def _defining_target(target: str) -> str | None:
    """Where the object ``target`` names is defined: ``module.qualname[.rest]``, or None.

    ``target`` is a dotted path through the package's re-exports (``goodfellow.X``,
    ``goodfellow.layers.X``, ``goodfellow.X.method``) or a bare public name (``LayerRule``), as
    docstrings write them.
    """
    parts = target.split(".")
    prefixed = parts[0] == "goodfellow"
    while parts and parts[0] in ("goodfellow", "layers"):
        parts = parts[1:]
    if not parts:
        return None
    # Where the first name may live: the package, its layers, any module exporting it.
    starts = [goodfellow, goodfellow.layers] + [
        module
        for name, module in sorted(sys.modules.items())
        if name.startswith("goodfellow.") and parts[0] in getattr(module, "__all__", ())
    ]
    if not prefixed and not any(hasattr(start, parts[0]) for start in starts):
        return None
    for start in starts:
        obj, found, used = start, None, 0
        for index, part in enumerate(parts):
            obj = getattr(obj, part, None)
            if obj is None:
                break
            module = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if module and qualname and module.startswith("goodfellow.") and "<" not in qualname:
                found, used = f"{module}.{qualname}", index + 1
        if found:
            return ".".join([found, *parts[used:]])
    return None


def _resolve_reexports(app, env, node, contnode):
    """Resolve a name written as the package re-exports it to the module that defines it.

    The package re-exports every public name (``goodfellow.goodfellow_backprop``,
    ``goodfellow.layers.LayerRule``), while the API page documents each name in its module
    (``goodfellow.backprop.goodfellow_backprop``). Docstrings and pages may use either spelling,
    or the bare public name.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    new_target = _defining_target(target)
    if new_target is None or new_target == target:
        return None
    domain = env.get_domain("py")
    new_node = node.deepcopy()
    new_node["reftarget"] = new_target
    return domain.resolve_xref(
        env, node.get("refdoc", ""), app.builder, node["reftype"], new_target, new_node, contnode
    )


# -- Bibliography --------------------------------------------------------------------------------

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# -- nbsphinx: notebooks are executed at every build ----------------------------------------------

nbsphinx_execute = "always"
nbsphinx_allow_errors = False
nbsphinx_timeout = 600
nbsphinx_kernel_name = "python3"
nbsphinx_execute_arguments = [
    "--InlineBackend.figure_formats={'retina'}",
    "--InlineBackend.rc=figure.dpi=96",
    # ipykernel warns on every start that its local TCP channel is unencrypted; nothing to act on.
    "--IPKernelApp.log_level=ERROR",
]
# nbsphinx would otherwise load require.js (and, with widgets, more) from a CDN on every page.
nbsphinx_requirejs_path = ""
nbsphinx_widgets_path = ""
html_sourcelink_suffix = ""

# Every tutorial page starts with links to run it: the notebook itself (copied next to the page
# by nbsphinx, with its outputs), Colab and Binder (both read the notebook from the repository).
_GITHUB_PATH = REPOSITORY_URL.removeprefix("https://github.com/")
_COLAB = f"https://colab.research.google.com/github/{_GITHUB_PATH}/blob/{REPOSITORY_BRANCH}/"
_BINDER = f"https://mybinder.org/v2/gh/{_GITHUB_PATH}/{REPOSITORY_BRANCH}?labpath="
nbsphinx_prolog = r"""
{%- set notebook = env.docname.split('/')[-1] ~ '.ipynb' %}
{%- set repo_path = 'tutorials/' ~ notebook %}
.. raw:: html

    <div class="admonition note run-this-notebook">
      <p class="admonition-title">Run this tutorial yourself</p>
      <p>This page is a Jupyter notebook, executed when the site was built.
      <a class="reference internal" href="{{ notebook }}" download>Download the notebook</a>,
      or open it in <a class="reference external" href="COLAB{{ repo_path }}">Google Colab</a>
      or on <a class="reference external" href="BINDER{{ repo_path }}">Binder</a>. In Colab the
      notebook's first code cell installs goodfellow; elsewhere it does nothing (see
      <a class="reference internal" href="../installation.html#colab-and-binder">Installation</a>).
      Each exercise has a check cell that tells you whether your answer is right.</p>
    </div>
""".replace("COLAB", _COLAB).replace("BINDER", _BINDER)

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"goodfellow {release}"  # the version, in the header of every page
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_css_files = ["custom.css"]
html_js_files = ["search-summary.js"]
html_show_sourcelink = True
html_theme_options = {"navigation_with_keys": True}
html_sidebars = {
    "**": [
        "sidebar/brand.html",
        "sidebar/search.html",
        "sidebar/scroll-start.html",
        "sidebar/navigation.html",
        "project-links.html",
        "sidebar/scroll-end.html",
    ]
}
html_context = {
    "repository_url": REPOSITORY_URL,
    "issues_url": ISSUES_URL,
    "license_url": f"{REPOSITORY_URL}/blob/{REPOSITORY_BRANCH}/LICENSE",
    "citation_url": f"{REPOSITORY_URL}/blob/{REPOSITORY_BRANCH}/CITATION.cff",
}
pygments_style = "friendly"
pygments_dark_style = "monokai"

# sphinx-copybutton: copy the code of input cells and code blocks, never outputs or prompts.
copybutton_selector = "div:not(.output_area) > div.highlight > pre"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_exclude = ".linenos, .gp, .go"


def _documented_namedtuple_fields() -> set[int]:
    """The ids of NamedTuple field accessors in goodfellow that have a docstring in the source."""
    import inspect

    from sphinx.pycode import ModuleAnalyzer

    documented = set()
    for name in goodfellow.__all__:
        cls = getattr(goodfellow, name)
        if not (inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
            continue
        attribute_docs = ModuleAnalyzer.for_module(cls.__module__).find_attr_docs()
        for field in cls._fields:
            if (cls.__qualname__, field) in attribute_docs:
                documented.add(id(cls.__dict__[field]))
    return documented


_DOCUMENTED_FIELDS = _documented_namedtuple_fields()


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
    """Leave out a NamedTuple field that has no docstring of its own.

    Autodoc would show it as "Alias for field number N", listing the field a second time after
    the class docstring's own list of fields. Fields with a docstring in the source stay.
    """
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number") and id(obj) not in _DOCUMENTED_FIELDS:
        return True
    return None


def _replace_repository_url(app, docname, source):
    """Write the one repository setting into .rst pages (code blocks included)."""
    if "@REPOSITORY_URL@" in source[0]:
        source[0] = source[0].replace("@REPOSITORY_URL@", REPOSITORY_URL)


def _warn_about_tutorial_metadata(app):
    """Say which notebooks lack course metadata (tests/test_notebooks.py fails on them).

    Not a build warning: a tutorial in progress still builds, listed by its title alone.
    """
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for tutorial in TUTORIALS:
        if tutorial["missing"]:
            logger.info(
                "note: %s: the notebook's metadata has no %s under %r, so the Tutorials page and "
                "the lesson plan list it by its title only. Add them (in Jupyter: Edit > Notebook "
                "metadata): %s. See docs/teachers.rst, 'Adding a tutorial'.",
                tutorial["path"].relative_to(ROOT),
                ", ".join(tutorial["missing"]),
                TUTORIAL_METADATA_KEY,
                "; ".join(f"{key}: {TUTORIAL_FIELDS[key]}" for key in tutorial["missing"]),
            )
        elif tutorial["level"] not in LEVELS:
            logger.info(
                "%s: level %r is not one of %s",
                tutorial["path"].relative_to(ROOT), tutorial["level"], ", ".join(LEVELS),
            )


FIGURE_COMMENT = "# Figure:"


def _figure_alt(code: str) -> str:
    """The alt text a notebook cell gives its figure: a ``# Figure: ...`` comment, continued by
    the comment lines right below it."""
    lines, taking = [], False
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith(FIGURE_COMMENT):
            taking = True
            lines.append(stripped[len(FIGURE_COMMENT) :].strip())
        elif taking and stripped.startswith("#"):
            lines.append(stripped.lstrip("#").strip())
        else:
            taking = False
    return " ".join(lines)


def _api_target(env, text: str):
    """The documented object an inline code span of a tutorial names, or None."""
    import re

    match = re.fullmatch(r"([A-Za-z_][\w.]*)(\(.*\))?", text.strip())
    if not match:
        return None
    dotted = match.group(1)
    objects = env.get_domain("py").objects
    candidates = [dotted]
    name, _, rest = dotted.removeprefix("goodfellow.").partition(".")
    if name in goodfellow.__all__:
        module = getattr(getattr(goodfellow, name), "__module__", None)
        if module:
            candidates.append(f"{module}.{name}" + (f".{rest}" if rest else ""))
    for candidate in candidates:
        if candidate.startswith("goodfellow.") and candidate in objects:
            return candidate, objects[candidate]
    return None


ARXIV_ID = r"arXiv:(\d{4}\.\d{4,5})(v\d+)?"


def _link_arxiv_identifiers(doctree) -> None:
    """Every ``arXiv:NNNN.NNNNN`` in the text becomes a link to the paper's abstract page."""
    import re

    from docutils import nodes

    pattern = re.compile(ARXIV_ID)
    for text in list(doctree.findall(nodes.Text)):
        parent = text.parent
        if isinstance(parent, (nodes.reference, nodes.literal, nodes.literal_block, nodes.raw)):
            continue
        if any(isinstance(a, (nodes.reference, nodes.literal_block, nodes.raw, nodes.math))
               for a in _ancestors(parent)):
            continue
        value = str(text)
        if not pattern.search(value):
            continue
        pieces, last = [], 0
        for match in pattern.finditer(value):
            pieces.append(nodes.Text(value[last : match.start()]))
            uri = f"https://arxiv.org/abs/{match.group(1)}"
            pieces.append(nodes.reference(match.group(0), match.group(0), refuri=uri))
            last = match.end()
        pieces.append(nodes.Text(value[last:]))
        parent.replace(text, [piece for piece in pieces if not (
            isinstance(piece, nodes.Text) and not str(piece))])


def _ancestors(node):
    while node is not None:
        yield node
        node = node.parent


def _tutorial_links_and_figures(app, doctree, docname):
    """arXiv identifiers become links; in the tutorials, API names in prose link to the API
    page, and figures get alt text and a link to the full-size image."""
    from docutils import nodes

    _link_arxiv_identifiers(doctree)
    if not docname.startswith("tutorials/"):
        return
    last_code = ""
    for node in list(doctree.findall()):
        if isinstance(node, nodes.literal_block):
            last_code = node.astext()
        elif isinstance(node, nodes.image):
            alt = _figure_alt(last_code)
            if alt:
                node["alt"] = alt
            if "no-scaled-link" in node.get("classes", []):
                node["classes"].remove("no-scaled-link")
        elif isinstance(node, nodes.literal) and not isinstance(node.parent, nodes.reference):
            found = _api_target(app.env, node.astext())
            if found is None:
                continue
            fullname, entry = found
            uri = app.builder.get_relative_uri(docname, entry.docname) + "#" + entry.node_id
            reference = nodes.reference(
                "", "", internal=True, refuri=uri, reftitle=f"{fullname} (API reference)"
            )
            node.replace_self(reference)
            reference.append(node)


def _build_finished(app, exception):
    if exception is None and app.builder.format == "html":
        _write_handouts(Path(app.outdir))


def setup(app):
    app.connect("missing-reference", _resolve_reexports)
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
    app.connect("source-read", _replace_repository_url)
    app.connect("builder-inited", _warn_about_tutorial_metadata)
    app.connect("doctree-resolved", _tutorial_links_and_figures)
    app.connect("build-finished", _build_finished)
