"""Validation of user text shared by prompts, messages, tools and stop strings."""
from __future__ import annotations


def check_unicode(text: str, where: str) -> str:
    """``text`` itself; a ValueError naming ``where`` if it holds a lone surrogate (not encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} contains a lone surrogate at index {exc.start}; pass valid Unicode text "
                         "(decode bytes with errors='replace')") from None
    return text


def partial_suffix(text: str, markers: tuple[str, ...] | list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin one of ``markers`` (a marker still arriving)."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
