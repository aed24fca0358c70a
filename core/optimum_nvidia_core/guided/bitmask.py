"""The step's grammar bitmask: one persistent host buffer, filled in place by xgrammar, sent in one copy.

Per step the engine calls ``fill(matchers)`` for the guided sampled rows (xgrammar's batch matcher fills them in
C++ threads, in place), checks the rows it wants to check (``allows_any``, ``allows_other_than``), then
``to_device(rows)`` queues ONE non-blocking copy and returns the ``TokenBitmask`` the sampler applies on the
device. Fill and apply are separate calls: with asynchronous scheduling the forward of a step can run on the
device while the host fills its mask (the mask depends on the previous step's accepted tokens, and is needed only
at sampling time).

Two host buffers alternate, and a buffer is refilled only after its last copy has left it (a CUDA event), so a
non-blocking copy never reads a row the next step is writing.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..layers.token_bitmask import TokenBitmask, num_words


class GrammarBitmask:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        pinned = self.device.type == "cuda"
        shape = (max_rows, num_words(vocab_size))
        self._host = [torch.zeros(shape, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self._rows = [torch.zeros(max_rows, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self._copied: list[Any] = [None, None]  # CUDA events: the last copy out of each buffer
        self._current = 0
        self._num_filled = 0
        self._batch = _batch_matcher()

    @property
    def words(self) -> np.ndarray:
        """The filled rows on the host, int32 [G, ceil(V/32)] (a view: valid until the next ``fill``)."""
        return self._host[self._current][: self._num_filled].numpy()

    def fill(self, matchers: list[Any]) -> None:
        """Rows 0..G-1 := the allowed next tokens of ``matchers`` (guided.Matcher, one per guided sampled row)."""
        if len(matchers) > self._host[0].shape[0]:
            raise ValueError(f"{len(matchers)} guided rows, but the bitmask holds {self._host[0].shape[0]}")
        self._current ^= 1
        if self._copied[self._current] is not None:
            self._copied[self._current].synchronize()  # long done in practice: it was two steps ago
        self._num_filled = len(matchers)
        host = self._host[self._current]
        handles = [getattr(m, "grammar_matcher", None) for m in matchers]
        if len(matchers) > 1 and self._batch is not None and None not in handles:
            self._batch.batch_fill_next_token_bitmask(handles, host)  # C++ threads, one call
        else:
            for k, matcher in enumerate(matchers):
                matcher.fill_bitmask(host, k)

    def allows_any(self) -> np.ndarray:
        """bool [G]: whether each filled row allows any token (False: a dead end, or a finished grammar)."""
        return self.words.any(axis=1)

    def allows_other_than(self, index: int, token_ids: list[int]) -> bool:
        """Whether filled row ``index`` allows a token outside ``token_ids`` (e.g. other than end of sequence)."""
        row = self.words[index].view(np.uint32).copy()
        for token in token_ids:
            if 0 <= token < self.vocab_size:
                row[token // 32] &= ~np.uint32(1 << (token % 32))
        return bool(row.any())

    def to_device(self, rows: list[int] | None = None) -> TokenBitmask:
        """The filled rows on the device, in one non-blocking copy (plus the row indices when ``rows`` is given:
        the logits row each mask row constrains)."""
        g = self._num_filled
        words = self._host[self._current][:g]
        index = None
        if rows is not None:
            if len(rows) != g:
                raise ValueError(f"{len(rows)} row indices for {g} filled rows")
            host_rows = self._rows[self._current][:g]
            host_rows.copy_(torch.as_tensor(rows, dtype=torch.int64))
            index = host_rows.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            return TokenBitmask(words, index)  # the buffers alternate: this one is refilled two steps from now
        on_device = words.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._current] = event
        return TokenBitmask(on_device, index)


def _batch_matcher() -> Any:
    """xgrammar's batch matcher (fills many rows in C++ threads), or None without xgrammar."""
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar.BatchGrammarMatcher(max_threads=2)
