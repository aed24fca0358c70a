"""A test double of the engine's ModelRunner whose logits a test can tamper with (poison rows, raise, stall).

The engine must run on a thread of the test's process (``engine_process=False``) for the double to be used:
``faulty_engine(monkeypatch)`` swaps it in for the engines created while the fixture is active.
"""
from __future__ import annotations

from typing import Callable

import torch

from optimum_nvidia_core.engine import core
from optimum_nvidia_core.engine.model_runner import ModelRunner

Hook = Callable[[torch.Tensor, list], None]  # (logits [R, V], sampled sequences [R]) -> None; may edit logits


class FaultyModelRunner(ModelRunner):
    hook: Hook | None = None  # class-wide: set by the test, cleared by the fixture

    def compute_logits(self, hidden, attn, rows, seqs):
        logits = super().compute_logits(hidden, attn, rows, seqs)
        if FaultyModelRunner.hook is not None:
            FaultyModelRunner.hook(logits, seqs)
        return logits


def use_faulty_runner(monkeypatch) -> type[FaultyModelRunner]:
    monkeypatch.setattr(core, "ModelRunner", FaultyModelRunner)
    FaultyModelRunner.hook = None
    return FaultyModelRunner
