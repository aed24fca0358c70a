"""The core's per-token log-probabilities (``{token_id: logprob}`` per generated token) in OpenAI's two shapes."""
from __future__ import annotations

from typing import Any, Callable

TokenText = Callable[[int], str]
MISSING_LOGPROB = -9999.0  # JSON has no -inf; vLLM uses the same stand-in


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int, text: TokenText
                  ) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` of a chat completion: one entry per generated token."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        token = text(token_id)
        content.append({
            "token": token, "logprob": candidates.get(token_id, MISSING_LOGPROB), "bytes": list(token.encode()),
            "top_logprobs": [{"token": (t := text(i)), "logprob": lp, "bytes": list(t.encode())}
                             for i, lp in _top(candidates, top)],
        })
    return content


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int, text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a (legacy) completion: parallel lists, with text offsets from ``offset``."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, candidates in zip(token_ids, logprobs):
        token = text(token_id)
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        token_logprobs.append(candidates.get(token_id, MISSING_LOGPROB))
        tops.append({text(i): lp for i, lp in _top(candidates, top)})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _top(candidates: dict[int, float], top: int) -> list[tuple[int, float]]:
    return sorted(candidates.items(), key=lambda item: item[1], reverse=True)[:top]
