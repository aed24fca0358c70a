"""A rendered chat prompt to token ids, where the text of the messages never becomes control tokens.

A user or tool message holding "<|im_end|>\\n<|im_start|>system\\n..." must not forge a system turn. Before
rendering, every special-token text inside message content is swapped for a private-use placeholder; after
rendering, the prompt is encoded piece by piece: the template's own text as usual (its control tokens stay
control tokens), each placeholder as the plain text it stands for (special tokens split). A prompt without such
text is encoded in one piece, exactly as before. ``allow_special_tokens=True`` turns the guard off for a caller
who means to write control tokens into messages.
"""
from __future__ import annotations

import re
from typing import Any

_MARK = "\ue000"  # placeholder: _MARK + one character from _FIRST on, indexing the special text it hides
_FIRST = 0xE100


class SpecialTextGuard:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        texts = {t.content for t in decoder.values() if getattr(t, "special", False)}
        texts |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.specials = sorted((t for t in texts if t), key=len, reverse=True)[:0x1700]
        self._index = {t: i for i, t in enumerate(self.specials)}
        self._find = re.compile("|".join(re.escape(t) for t in self.specials)) if self.specials else None
        self._placeholder = re.compile(_MARK + "([\ue100-\uf8ff])")

    def hide(self, text: str) -> str:
        """``text`` with each special-token text replaced by its placeholder."""
        if self._find is None or not self._find.search(text):
            return text
        return self._find.sub(lambda m: _MARK + chr(_FIRST + self._index[m.group(0)]), text)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt; placeholders become the plain-text tokens of what they hide."""
        if _MARK not in prompt:
            return self._ids(prompt)
        ids: list[int] = []
        last = 0
        for m in self._placeholder.finditer(prompt):
            ids += self._ids(prompt[last:m.start()])
            ids += self._ids(self.specials[ord(m.group(1)) - _FIRST], split=True)
            last = m.end()
        return ids + self._ids(prompt[last:])

    def _ids(self, text: str, split: bool = False) -> list[int]:
        if not text:
            return []
        kwargs = {"split_special_tokens": True} if split else {}
        return list(self.tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])
