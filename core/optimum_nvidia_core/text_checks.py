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
