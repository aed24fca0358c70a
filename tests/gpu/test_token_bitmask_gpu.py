"""Grammar bitmasks on the GPU: unpacked and applied with the same torch code as on the CPU, the same results; the
step buffer's pinned, non-blocking copies never read a row the next step is writing. (No xgrammar on the GPU
image: the rows are filled by stand-ins that write known words, as xgrammar's fill would.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_nvidia_core.guided.bitmask import GrammarBitmask
from optimum_nvidia_core.layers.token_bitmask import TokenBitmask, apply_token_bitmask, num_words, unpack_bitmask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCABS = [128256, 49152 + 64, 32000, 37]


def random_words(rows: int, vocab: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, (rows, num_words(vocab)), dtype=torch.int32)


def numpy_reference(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits.astype(bool))


@pytest.mark.parametrize("vocab", VOCABS)
def test_unpack_and_apply_match_the_cpu(vocab):
    words = random_words(64, vocab)
    allowed = numpy_reference(words, vocab)
    assert torch.equal(unpack_bitmask(words.cuda(), vocab).cpu(), allowed)
    logits = torch.randn(96, vocab)
    rows = torch.randperm(96)[:64]
    for mask_rows in (None, rows):
        cpu = apply_token_bitmask(logits[:64] if mask_rows is None else logits, TokenBitmask(words, mask_rows))
        gpu_mask = TokenBitmask(words.cuda(), None if mask_rows is None else mask_rows.cuda())
        gpu = apply_token_bitmask((logits[:64] if mask_rows is None else logits).cuda(), gpu_mask)
        assert torch.equal(gpu.cpu(), cpu)
        masked_rows = slice(None) if mask_rows is None else rows
        assert torch.equal(torch.isfinite(cpu[masked_rows]), allowed)


class KnownWords:
    """Fills its row with fixed words (what a grammar matcher's fill does, without xgrammar)."""

    def __init__(self, words: torch.Tensor):
        self.words = words

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        bitmask[index] = self.words


def test_the_step_buffer_copies_in_the_background_without_races():
    vocab = 128256
    bitmask = GrammarBitmask(max_rows=256, vocab_size=vocab, device="cuda")
    steps = []
    for step in range(6):  # each fill overwrites a host buffer whose copy was queued two steps before
        words = random_words(200, vocab)
        torch.cuda._sleep(2_000_000)  # keep the device busy, so the copies really queue behind work
        bitmask.fill([KnownWords(w) for w in words])
        rows = torch.randperm(256)[:200].tolist()
        steps.append((words, rows, bitmask.to_device(rows)))
    torch.cuda.synchronize()
    for words, rows, on_device in steps:
        assert on_device.words.is_cuda and torch.equal(on_device.words.cpu(), words)
        assert on_device.rows.tolist() == rows
