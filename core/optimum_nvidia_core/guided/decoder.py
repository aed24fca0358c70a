"""Grammar matchers for guided sequences, with nothing slow on the engine's step loop.

``GuidedDecoder`` builds the grammar vocabulary (xgrammar's tokenizer info, ~0.5 s for a 49k vocabulary) in the
background as soon as it is created, and compiles each new schema in a thread pool (a 20,000-value enum takes
seconds): ``matchers_async(schema, n)`` returns a Future, and the engine keeps stepping the other requests until it
is done. xgrammar's compiler releases the interpreter lock while it works. Compiled grammars are cached by schema.

Each guided sequence has a ``Matcher``: the engine fills its row of the step's bitmask (``GrammarBitmask``) before
sampling and ``accept``s the sampled token after; the request ends when ``is_terminated()``.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .schema import check_json_schema, grammar_from_text, import_xgrammar, schema_text


def bitmask_to_bool(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed mask, int32 [ceil(V/32)] (bit b of word w = token 32*w + b), as bool [V], True = allowed.

    numpy's unpackbits does it in one pass; the little-endian byte order of the int32 words is what makes
    "little" bit order line up with token ids.
    """
    bits = np.unpackbits(words.cpu().numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(bits.view(np.bool_))


class Matcher:
    """The grammar state of one sequence. Not thread-safe; the engine thread owns it."""

    def __init__(self, grammar_matcher: Any, vocab_size: int, stop_token_ids: list[int]):
        self.grammar_matcher = grammar_matcher  # xgrammar.GrammarMatcher
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._row: torch.Tensor | None = None  # int32 [1, ceil(V/32)], for fill_mask only

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into row ``index`` of ``bitmask`` (int32 [B, ceil(V/32)], on the CPU)."""
        self.grammar_matcher.fill_next_token_bitmask(bitmask, index)

    def fill_mask(self, mask_row: torch.Tensor) -> bool:
        """The allowed next tokens as bool [V] (True = allowed) in ``mask_row`` (for tests and tools; the engine
        uses packed rows). Returns False when nothing is allowed (a finished grammar, or a dead end)."""
        if mask_row.dtype != torch.bool or tuple(mask_row.shape) != (self.vocab_size,):
            raise ValueError(f"mask_row must be a bool tensor of shape ({self.vocab_size},), got "
                             f"{mask_row.dtype} {tuple(mask_row.shape)}")
        if self.is_terminated():
            mask_row.zero_()
            return False
        if self._row is None:
            self._row = torch.zeros(1, -(-self.vocab_size // 32), dtype=torch.int32)
        self.fill_bitmask(self._row, 0)
        allowed = bitmask_to_bool(self._row[0], self.vocab_size).numpy()
        np.copyto(mask_row.numpy(), allowed)
        return bool(allowed.any())

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar does not allow it."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size or self.grammar_matcher.is_terminated():
            return False
        return bool(self.grammar_matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        """The JSON is complete and a stop token was accepted: the sequence is done."""
        return bool(self.grammar_matcher.is_terminated())

    def allowed_eos(self) -> bool:
        """Whether the output so far is a complete value, so a stop token may end it now."""
        return not self.grammar_matcher.is_terminated() and bool(self.grammar_matcher.is_completed())


class GuidedDecoder:
    """The grammar vocabulary of one tokenizer, a compile pool and a bounded cache of compiled grammars.

    ``tokenizer`` is a Hugging Face tokenizer, or a model directory to load one from (the engine core has no
    tokenizer object of its own). ``vocab_size`` is the width of the model's logits, which may exceed
    ``len(tokenizer)`` (padded embeddings); the extra ids are never allowed. ``stop_token_ids`` end a finished
    grammar (default: the tokenizer's EOS); pass the engine's EOS ids so a guided sequence stops the way an
    unguided one does. Nothing blocks here: the vocabulary is built by the pool, first.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | None = None,
                 max_cached_grammars: int = 256, compile_threads: int = 2):
        self._xgr = import_xgrammar()
        self.vocab_size = int(vocab_size)
        self._pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar-compile")
        self._compiler_future = self._pool.submit(self._build_compiler, tokenizer, stop_token_ids)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._max_cached = max_cached_grammars
        self._lock = threading.Lock()

    def _build_compiler(self, tokenizer: Any, stop_token_ids: list[int] | None) -> Any:
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        info = self._xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                        stop_token_ids=stop_token_ids)
        self._stop_token_ids = list(info.stop_token_ids)
        threads = max(1, min(4, os.cpu_count() or 1))
        return self._xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)  # we cache, bounded

    @property
    def ready(self) -> bool:
        """Whether the grammar vocabulary is built (guided requests before that wait for it, in the pool)."""
        return self._compiler_future.done()

    @property
    def stop_token_ids(self) -> list[int]:
        self._compiler_future.result()
        return self._stop_token_ids

    def matchers_async(self, json_schema: dict[str, Any] | None, n: int = 1) -> "Future[list[Matcher]]":
        """``n`` fresh matchers for ``json_schema``, built in the pool. A cached grammar is ready at once."""
        key = schema_text(json_schema)
        with self._lock:
            cached = self._compiled.get(key)
        if cached is not None:
            done: Future = Future()
            done.set_result([self._new_matcher(cached) for _ in range(n)])
            return done
        return self._pool.submit(lambda: [self._new_matcher(self.compiled_grammar(json_schema)) for _ in range(n)])

    def matcher(self, json_schema: dict[str, Any] | None = None) -> Matcher:
        """A fresh matcher for one sequence, compiled here if need be; ``None`` or ``{}`` accepts any JSON object."""
        return self._new_matcher(self.compiled_grammar(json_schema))

    def _new_matcher(self, compiled: Any) -> Matcher:
        return Matcher(self._xgr.GrammarMatcher(compiled), self.vocab_size, self.stop_token_ids)

    def compiled_grammar(self, json_schema: dict[str, Any] | None) -> Any:
        if json_schema is not None:
            check_json_schema(json_schema, "guided_json")
        key = schema_text(json_schema)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = self._compiler_future.result().compile_grammar(grammar_from_text(key, "guided_json"))
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._compiled)

    def close(self) -> None:
        """Stop the pool; compiles not yet started are dropped (their futures cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
