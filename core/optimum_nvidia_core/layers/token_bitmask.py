"""Grammar masks as packed bits, applied to the logits on their own device.

A mask row is xgrammar's layout: int32 words [ceil(V/32)], bit b of word w set = token 32*w + b allowed. The host
fills the rows of the guided sequences only (``TokenBitmask.rows`` says which logits rows they constrain), they
travel to the device in one copy, and the bits are unpacked there with shifts: 32x less to copy than a bool mask,
and no host sync. One torch implementation for every device: the GPU image has no xgrammar, and xgrammar 0.2.9's
CPU kernel masked an allowed token when tried here (2 rows of 4 tokens), so it is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 32


@dataclass
class TokenBitmask:
    """The grammar masks of one step, on the logits' device."""

    words: torch.Tensor  # int32 [G, ceil(V/32)]: one row per guided sampled row
    rows: torch.Tensor | None = None  # int64 [G]: the logits row each mask row constrains; None = rows 0..G-1

    @classmethod
    def from_bool(cls, allowed: torch.Tensor, rows: torch.Tensor | None = None) -> "TokenBitmask":
        return cls(pack_bool_mask(allowed), rows)


def num_words(vocab_size: int) -> int:
    return -(-vocab_size // BITS)


def pack_bool_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [G, V] (True = allowed) -> int32 words [G, ceil(V/32)], the layout xgrammar fills."""
    g, v = allowed.shape
    padded = torch.zeros(g, num_words(v) * BITS, dtype=torch.int64, device=allowed.device)
    padded[:, :v] = allowed.to(torch.int64)
    weights = torch.ones(BITS, dtype=torch.int64, device=allowed.device) << torch.arange(BITS, device=allowed.device)
    words = (padded.view(g, -1, BITS) * weights).sum(-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [G, W] -> bool [G, vocab_size], True = allowed. Ids past 32*W are not allowed.

    Unpacked byte by byte (uint8 shifts move 4x less than int32 ones); the words are little-endian on every
    device we run on, so byte k of word w holds tokens 32*w + 8*k ... + 7, lowest bit first.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = ((words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1).view(words.shape[0], -1).bool()  # [G, 32*W]
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


def apply_token_bitmask(logits: torch.Tensor, bitmask: TokenBitmask) -> torch.Tensor:
    """logits float [S, V] (not modified) -> a copy with -inf where the grammar forbids a token."""
    allowed = unpack_bitmask(bitmask.words, logits.shape[1])
    if bitmask.rows is None:
        return torch.where(allowed, logits, float("-inf"))
    masked = torch.where(allowed, logits.index_select(0, bitmask.rows), float("-inf"))
    return logits.index_copy(0, bitmask.rows, masked)
