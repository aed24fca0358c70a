"""Which CUDA graphs an engine captures at start (each costs a warm-up forward and a capture): prefill chunks longer
than MIXED_GRAPH_TOKENS are compute-bound and run eagerly, so no graph is made for them."""
from __future__ import annotations

import torch

from optimum_nvidia_core.engine.cuda_graph_runner import (
    MIXED_GRAPH_TOKENS, CudaGraphRunner, batch_buckets, token_buckets,
)


def _runner(max_batch_size: int, max_prefill_tokens: int, max_mixed_tokens: int) -> CudaGraphRunner:
    # The constructor only lays out the static buffers (here on the CPU); capture() is what needs CUDA.
    return CudaGraphRunner(torch.nn.Identity(), max_batch_size, max_blocks_per_seq=4, device=torch.device("cpu"),
                           max_prefill_tokens=max_prefill_tokens, max_mixed_tokens=max_mixed_tokens)


def test_prefill_graphs_stop_at_the_mixed_limit():
    runner = _runner(1024, max_prefill_tokens=8192, max_mixed_tokens=MIXED_GRAPH_TOKENS)
    assert runner.prefill_buckets == token_buckets(MIXED_GRAPH_TOKENS) and runner.prefill_buckets[-1] == 2048
    assert runner.mixed_buckets == token_buckets(MIXED_GRAPH_TOKENS)
    assert runner.buckets == batch_buckets(1024)
    assert len(runner.buckets) + len(runner.prefill_buckets) + len(runner.mixed_buckets) == 36 + 14 + 14


def test_short_prefill_limits_are_kept():
    runner = _runner(4, max_prefill_tokens=100, max_mixed_tokens=0)
    assert runner.prefill_buckets == [16, 32, 48, 64, 96, 100] and runner.mixed_buckets == []
    assert runner.input_ids.shape[0] == 100  # static buffers sized for the largest graph
