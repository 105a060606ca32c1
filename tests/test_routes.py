"""goodfellow.layers.routes: equivalent computations timed once per key, the faster kept."""

from __future__ import annotations

import time

import torch

from goodfellow.layers import routes


def _route(calls: list[str], name: str, seconds: float):
    def run():
        calls.append(name)
        time.sleep(seconds)
        return name

    return run


def test_every_route_is_timed_in_turns_then_only_the_fastest_runs(monkeypatch):
    monkeypatch.setattr(routes, "_CHOSEN", {})
    calls: list[str] = []
    candidates = {"slow": _route(calls, "slow", 0.02), "fast": _route(calls, "fast", 0.0)}
    first = routes.fastest("key", candidates, torch.device("cpu"))
    # each warmed up in turns, then timed in turns
    assert calls == ["slow", "fast"] * (routes._UNTIMED_ROUNDS + routes._TIMED_ROUNDS)
    assert first == "fast"  # the result of the last route timed
    assert routes.chosen() == {"key": "fast"}
    calls.clear()
    assert [routes.fastest("key", candidates, torch.device("cpu")) for _ in range(3)] == [
        "fast"
    ] * 3
    assert calls == ["fast"] * 3
    routes.fastest("other key", candidates, torch.device("cpu"))
    assert set(routes.chosen()) == {"key", "other key"}  # one choice per key


def test_one_slow_run_of_the_faster_route_does_not_decide(monkeypatch):
    """A slow spell of the machine during one timed run: the fastest run of each counts."""
    monkeypatch.setattr(routes, "_CHOSEN", {})
    runs = {"usually fast": 0, "steady": 0}
    # the first timed run of "usually fast" is slow; "steady" always takes 10 ms
    first_timed = routes._UNTIMED_ROUNDS + 1
    delays = {"usually fast": lambda k: 0.05 if k == first_timed else 0.0, "steady": lambda k: 0.01}

    def run(name):
        def route():
            runs[name] += 1
            time.sleep(delays[name](runs[name]))
            return name

        return route

    routes.fastest("key", {name: run(name) for name in runs}, torch.device("cpu"))
    assert routes.chosen() == {"key": "usually fast"}


def test_forced_runs_that_route_without_timing_and_nests(monkeypatch):
    monkeypatch.setattr(routes, "_CHOSEN", {})
    calls: list[str] = []
    candidates = {"a": _route(calls, "a", 0.0), "b": _route(calls, "b", 0.0)}
    with routes.forced("b"):
        assert routes.fastest("key", candidates, torch.device("cpu")) == "b"
        with routes.forced("a"):
            assert routes.fastest("key", candidates, torch.device("cpu")) == "a"
        with routes.forced("not a candidate"):  # ignored where it is not offered
            routes.fastest("key", candidates, torch.device("cpu"))
        assert routes.fastest("key", candidates, torch.device("cpu")) == "b"
    assert calls[:2] == ["b", "a"]
    assert "key" in routes.chosen()  # the unoffered name fell through to timing


def test_choice_names_the_route_fastest_runs_and_times_only_once(monkeypatch):
    monkeypatch.setattr(routes, "_CHOSEN", {})
    calls: list[str] = []
    candidates = {"slow": _route(calls, "slow", 0.02), "fast": _route(calls, "fast", 0.0)}
    assert routes.choice("key", candidates, torch.device("cpu")) == "fast"
    timed = len(calls)
    assert routes.choice("key", candidates, torch.device("cpu")) == "fast"
    assert len(calls) == timed  # remembered, nothing run again
    with routes.forced("slow"):
        assert routes.choice("key", candidates, torch.device("cpu")) == "slow"
    assert routes.fastest("key", candidates, torch.device("cpu")) == "fast"
