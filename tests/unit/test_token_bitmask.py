"""layers/token_bitmask.py on the CPU: xgrammar's packed layout, unpacked and applied to the logits (the same torch
code runs on the GPU; tests/gpu/test_token_bitmask_gpu.py compares the two)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_nvidia_core.layers.token_bitmask import (
    TokenBitmask, apply_token_bitmask, num_words, pack_bool_mask, unpack_bitmask,
)


def numpy_reference(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits.astype(bool))


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 49216])
def test_pack_and_unpack_are_inverse_and_match_the_bit_layout(vocab):
    allowed = torch.rand(5, vocab, generator=torch.Generator().manual_seed(vocab)) < 0.5
    words = pack_bool_mask(allowed)
    assert words.dtype == torch.int32 and words.shape == (5, num_words(vocab))
    assert torch.equal(unpack_bitmask(words, vocab), allowed)
    assert torch.equal(numpy_reference(words, vocab), allowed)  # bit b of word w is token 32 * w + b


def test_the_layout_is_xgrammars():
    xgr_testing = pytest.importorskip("xgrammar.testing")
    words = torch.randint(-2**31, 2**31 - 1, (3, 40), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bitmask(words, 1270), xgr_testing.bitmask_to_bool_mask(words, 1270).bool())


def test_apply_masks_only_the_guided_rows_and_leaves_the_logits_alone():
    logits = torch.randn(6, 70, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    allowed = torch.zeros(2, 70, dtype=torch.bool)
    allowed[0, [3, 64, 69]] = True
    allowed[1, :10] = True
    out = apply_token_bitmask(logits, TokenBitmask.from_bool(allowed, torch.tensor([4, 1])))
    assert torch.equal(logits, before)
    assert torch.isfinite(out[4]).nonzero().flatten().tolist() == [3, 64, 69]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == list(range(10))
    assert torch.equal(out[[0, 2, 3, 5]], logits[[0, 2, 3, 5]])
    assert torch.equal(out[4, [3, 64, 69]], logits[4, [3, 64, 69]])
    every_row = apply_token_bitmask(logits[:2], TokenBitmask.from_bool(allowed))
    assert torch.equal(torch.isfinite(every_row), allowed)


def test_ids_past_the_mask_are_never_allowed():
    words = torch.full((1, 2), -1, dtype=torch.int32)  # 64 tokens allowed, logits 70 wide (padded embeddings)
    out = apply_token_bitmask(torch.zeros(1, 70), TokenBitmask(words))
    assert torch.isfinite(out[0, :64]).all() and torch.isinf(out[0, 64:]).all()
