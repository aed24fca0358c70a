"""The INT4 GEMM tuner's choice (kernels/int4_gemm.choose) when candidates fail to compile or launch, as a tile
that needs more shared memory than the card has does on the H200 (262,144 bytes asked, 232,448 there). The timer
and the launch are replaced (no GPU here): what is checked is which candidate the tuner keeps, never the kernel."""
from __future__ import annotations

import importlib

import pytest
import torch
from triton.runtime.errors import OutOfResources

from optimum_nvidia_core.kernels.int4_gemm import candidates, choose

module = importlib.import_module("optimum_nvidia_core.kernels.int4_gemm")  # the package exports the function


@pytest.fixture
def tuner(monkeypatch):
    """choose() with a fake card: configs in ``failing`` raise OutOfResources; the others take ``time_of``."""
    launched = []
    state = {"failing": lambda c: False, "capturing": False}

    def launch(x, qweight, scales, zeros, bias, config):
        launched.append(config)
        if state["failing"](config):
            raise OutOfResources(262144, 232448, "shared memory")
        return x

    def graph_time(fn):
        fn()
        return time_of(launched[-1])

    monkeypatch.setattr(module, "_CHOSEN", {})
    monkeypatch.setattr(module, "_FAILED", set())
    monkeypatch.setattr(module, "_launch", launch)
    monkeypatch.setattr(module, "_graph_time", graph_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    state["launched"] = launched
    return state


def time_of(config) -> float:
    return 1.0 / config.block_n  # wider tiles "faster": the widest (the ones that fail below) would win


def args(m: int, n: int = 1024, k: int = 1024, group: int = 128):
    return (torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, k // 8, dtype=torch.int32),
            torch.zeros(n, k // group, dtype=torch.bfloat16), torch.zeros(n, k // group, dtype=torch.uint8), None)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_a_candidate_that_fails_is_skipped_and_never_picked(tuner, m):
    too_big = lambda c: c.block_n == 128  # noqa: E731 - the widest tiles "do not fit"
    tuner["failing"] = too_big
    assert any(too_big(c) for c in candidates(m, 128, 1024)) and not all(too_big(c) for c in candidates(m, 128, 1024))
    chosen = choose(*args(m))
    assert not too_big(chosen)
    runnable = [c for c in candidates(m, 128, 1024) if not too_big(c)]
    assert time_of(chosen) == min(map(time_of, runnable))  # the fastest of those that run
    assert {c for c, *_ in module._FAILED} == {c for c in candidates(m, 128, 1024) if too_big(c)}
    assert choose(*args(m)) == chosen  # kept: timed once per (shape, M bucket)


def test_under_capture_an_untimed_shape_takes_the_first_candidate_not_known_to_fail(tuner):
    first = candidates(1, 128, 1024)[0]
    tuner["failing"] = lambda c: c == first
    choose(*args(1))  # eager: times them all, learns that `first` fails on this card
    tuner["capturing"] = True
    launched = len(tuner["launched"])
    fallback = choose(*args(1, n=2048))  # another shape, first seen inside a capture: nothing can be timed
    assert fallback == candidates(1, 128, 1024)[1] and len(tuner["launched"]) == launched


def test_when_no_candidate_runs_the_error_names_the_shape_and_the_failures(tuner):
    tuner["failing"] = lambda c: True
    with pytest.raises(RuntimeError, match=r"no INT4 GEMM candidate runs for x \(16, 1024\).*OutOfResources"):
        choose(*args(16))
