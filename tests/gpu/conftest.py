"""GPU kernel tests: skipped without CUDA.

Kernel authors can also run the kernel tests on the CPU through Triton's interpreter:
``TRITON_INTERPRET=1 PYTHONPATH=core:. python -m pytest tests/gpu -k kernel`` (slow, and its fp8 rounding is not
the GPU's, so FP8 tolerances there are loose).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.gpu.kernel_checks import INTERPRET


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for the kernel tests)")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run (METHOD: the kernel must be right on any valid input); the seed is printed
    # so a failure can be replayed with GPU_TEST_SEED.
    seed = int(os.environ.get("GPU_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    print(f"seed={seed}")
