"""Token ids to streamed text, one step at a time.

Incremental: each step decodes only a short window of recent tokens (``prefix_offset:``) and keeps the part past
what the window's head already produced (``read_offset``), so the cost per token does not grow with the output.
UTF-8 safe: while the window's text ends in U+FFFD (a character whose bytes span tokens), nothing is released.
Stop strings are matched across token boundaries and never emitted: text that could still become the start of a
stop string is held back, and the text is cut where a stop string begins. Joined together, the deltas (plus
``flush()``) equal ``tokenizer.decode(output_ids, skip_special_tokens=...)``, cut at the stop string if one hit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimum_nvidia_core.sampling_params import SamplingParams

_INCOMPLETE = "\ufffd"  # what decode() shows for a character whose bytes have not all arrived


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: "SamplingParams"):
        self.tokenizer = tokenizer
        self.backend = _backend_decoder(tokenizer)
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop)
        self.min_tokens = params.min_tokens
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []  # output ids seen so far
        self.prefix_offset = 0  # window start: context so the next tokens decode as they would in the full text
        self.read_offset = 0  # tokens before this are already in self.text
        self.text = ""  # decoded output so far, complete characters only; cut at the stop string
        self.num_emitted = 0  # characters of self.text already returned
        self.stop_checked = 0  # characters of self.text already searched for stop strings
        self.stop_reason: str | None = None  # the stop string that ended the text

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Add tokens; return (new text safe to show, the stop string if one was hit else None)."""
        if self.stop_reason is not None:
            return "", self.stop_reason
        self.token_ids.extend(new_token_ids)
        self.text += self._decode_new(final=False)
        if self._stops_active():
            self._find_stop()
        else:
            self.stop_checked = len(self.text)
        return self._emit(final=False), self.stop_reason

    def flush(self) -> str:
        """The generation ended: release held-back text (an incomplete character, a partial stop string)."""
        if self.stop_reason is None:
            self.text += self._decode_new(final=True)
            if self._stops_active():
                self._find_stop()
        return self._emit(final=True)

    # -- decoding -----------------------------------------------------------------------------------------------
    def _decode(self, token_ids: list[int]) -> str:
        if self.backend is not None:  # the Rust tokenizer directly: transformers' decode() wrapper costs ~4x more
            return self.backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(window_text) <= len(prefix_text) or (window_text.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet, or a character still incomplete: wait for its next bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return window_text[len(prefix_text) :]

    # -- stop strings -------------------------------------------------------------------------------------------
    def _stops_active(self) -> bool:
        return bool(self.stop) and len(self.token_ids) >= self.min_tokens

    def _find_stop(self) -> None:
        """Search the text added since the last search (plus an overlap of one stop string) for the earliest
        stop string; cut the text there."""
        start = max(self.num_emitted, self.stop_checked - self.max_stop_len + 1)
        self.stop_checked = len(self.text)
        hits = [(index, s) for s in self.stop if (index := self.text.find(s, start)) != -1]
        if hits:
            index, stop = min(hits)
            self.text = self.text[:index]
            self.stop_reason = stop

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            tail = self.text[-(len(stop) - 1) :] if len(stop) > 1 else ""  # a full match was already cut
            for i, char in enumerate(tail):
                if char == stop[0] and stop.startswith(tail[i:]):
                    longest = max(longest, len(tail) - i)
                    break
        return longest

    def _emit(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stop_reason is None and self._stops_active():
            end = max(self.num_emitted, end - self._partial_stop_len())
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta


def _backend_decoder(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast transformers tokenizer, when decoding through it gives the same
    text as ``tokenizer.decode`` (no clean-up of tokenization spaces); else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend
