"""Input checks of one request that need to know the model (its vocabulary, its KV cache), and the plain forms of
what callers pass as prompts (numpy arrays and integers included). Pure functions: they run with the prompt check,
on the caller's side, so a bad request fails alone before it reaches the batch."""
from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator, Mapping, Set
from typing import Any

from .sampling_params import SamplingParams


class ContextLengthError(ValueError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context (max_seq_len) or its KV cache.
    A ValueError; its own type so that a chat can drop old turns and try again (OpenAI: context_length_exceeded)."""


def as_token_ids(prompt: Any) -> Any:
    """A token-id prompt as a list of Python ints (numpy / torch arrays and numpy integers accepted); text and
    values of other types come back unchanged, for the prompt check to name."""
    if isinstance(prompt, str):
        return prompt
    if _is_array(prompt):
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return [operator.index(t) if _is_integer(t) else t for t in prompt]
    return prompt


def prompt_list(prompts: Any) -> list:
    """What ``LLM.generate`` got, as a list of prompts: one text or one token-id sequence is a list of one."""
    if isinstance(prompts, str):
        return [prompts]
    if _is_array(prompts):
        prompts = prompts.tolist()  # 1-D: one prompt of ids; 2-D: one prompt per row
    if isinstance(prompts, (list, tuple)):
        return [prompts] if prompts and _is_integer(prompts[0]) else list(prompts)
    kind = type(prompts).__name__
    if isinstance(prompts, (Iterator, Mapping, Set)):
        raise TypeError(f"prompts is a {kind}; generate needs a list (all prompts go into one batch): "
                        "pass list(prompts)")
    raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; got {kind}")


def check_kv_room(num_prompt_tokens: int, params: SamplingParams, kv_cache_tokens: int) -> None:
    """Refuse, up front, a request whose prompt plus max_tokens cannot fit in the whole KV cache: it would fail
    part-way, after streaming tokens, with whatever it had produced lost. (A request that fits the cache alone
    always finishes: under load it waits or is preempted, never fails.)"""
    wanted = num_prompt_tokens + (params.max_tokens or 1)
    if wanted > kv_cache_tokens:
        asked = f"max_tokens={params.max_tokens}" if params.max_tokens else "at least one new token"
        room = max(kv_cache_tokens - num_prompt_tokens, 0)
        raise ContextLengthError(
            f"{asked} does not fit in the KV cache: it holds {kv_cache_tokens} tokens and the prompt has "
            f"{num_prompt_tokens}, leaving room for {room}; lower max_tokens, shorten the prompt, or build the "
            "engine with more KV-cache blocks (num_kv_blocks, or more GPU memory)")


def _is_integer(value: Any) -> bool:
    # numpy integers register as Integral; so does bool, which is no token id (the prompt check names it)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_array(value: Any) -> bool:
    return hasattr(value, "__array__") and hasattr(value, "tolist")  # numpy arrays, torch tensors
