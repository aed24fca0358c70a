"""Model building blocks. Each layer's CPU path is plain torch (the reference); on CUDA the layers dispatch to the
Triton kernels of optimum_nvidia_core.kernels, which compute the same function (tests/gpu checks each one)."""
from __future__ import annotations

_kernels = None  # the kernels module once imported, or False where Triton is missing


def cuda_kernels():
    """optimum_nvidia_core.kernels, imported on first use (it imports Triton), or None when it cannot load."""
    global _kernels
    if _kernels is None:
        try:
            from optimum_nvidia_core import kernels
            _kernels = kernels
        except ImportError:
            _kernels = False
    return _kernels or None
