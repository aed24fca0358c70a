"""What crosses the engine core's boundary: token ids and sampling settings in, token ids and finish reasons out.

Plain picklable records, so the core can run in its own process (``core_proc``) or on a thread (``core_client``)
behind the same interface; it is also the seam where another backend (TensorRT-LLM) would plug in. No text, no
tokenizer: detokenizing, stop strings and tool calls are the output processor's, above the core.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"  # the core reads its token-level fields; stop strings are the output side's


@dataclass(slots=True)
class EngineCoreOutput:
    """New tokens of one of a request's n completions (``index``) after one step.

    ``finish_reason`` is decided from token ids alone: "stop" (end of sequence, a stop token id, a completed
    grammar; the last token is then the stop token), "length", "abort"; ``error`` fails the whole request."""

    request_id: str
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None  # one {token: logprob} per new token, when asked for
    num_cached_tokens: int = 0  # prompt tokens this completion got from the prefix cache
    error: str | None = None
    bad_request: bool = False  # with error: the request's own input caused it (a schema, a size), not the engine


@dataclass
class EngineInfo:
    """What the caller's side needs to know of a loaded engine (sent once, when the core is ready)."""

    model_dir: str  # config.json and tokenizer files
    model_name: str
    max_seq_len: int
    vocab_size: int  # width of the logits
    eos_token_ids: list[int]
    device: str
    num_blocks: int
    block_size: int


def check_token_ids(prompt_token_ids: list[int], params: "SamplingParams", vocab_size: int) -> None:
    """Raise a ValueError naming the problem when a prompt or stop token id is not a token of the model: an id
    past the vocabulary would index out of bounds inside the step and fail every request sharing it."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty; pass at least one token of text")
    bad = [t for t in prompt_token_ids if not (type(t) is int and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size}); got {bad[:5]}")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids must be token ids of this model, in [0, {vocab_size}); got {bad[:5]}; "
                         "take them from the model's tokenizer (e.g. tokenizer.convert_tokens_to_ids)")
