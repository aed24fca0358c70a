"""What a request returns: whole results and streamed deltas share one type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Metrics:
    arrival_time: float = 0.0  # time.perf_counter() when submitted
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def decode_tokens_per_s(self, completion_tokens: int) -> float | None:
        if self.first_token_time is None or self.finished_time is None or completion_tokens < 2:
            return None
        span = self.finished_time - self.first_token_time
        return (completion_tokens - 1) / span if span > 0 else None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Completion:
    """One of the n completions of a request."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob} for the top-N and the sampled
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None  # the <think> part of a reasoning model's reply


@dataclass
class RequestOutput:
    """A finished request (``generate``/``chat``) or one streamed delta (``stream``/``astream``).

    For a delta, ``text``, ``reasoning`` and ``token_ids`` are the new part only, ``index`` says which of the n completions it
    belongs to, and only the last delta of a request has ``finished=True``, ``finish_reason``, ``usage``, ``metrics``.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    finished: bool = False
    index: int = 0
    usage: Usage | None = None
    metrics: Metrics | None = None
    logprobs: list[dict[int, float]] | None = None
    choices: list[Completion] = field(default_factory=list)  # all n completions, for a finished n > 1 request
    tool_calls: list[ToolCall] = field(default_factory=list)  # filled by LLM.chat when tools were given
    error: str | None = None
    reasoning: str | None = None  # a reasoning model's <think> part (a delta's new part), apart from ``text``


class OutputCutOffError(ValueError):
    """A constrained reply (a forced tool call, structured output) was cut off at max_tokens before it was
    complete, so there is no call or object to return."""


def cut_off_error(what: str, max_tokens: int | None) -> OutputCutOffError:
    """The error both plugins raise for a constrained reply that ended with finish_reason "length"."""
    if max_tokens is None:
        fix = "shorten the prompt or build the engine with a larger max_seq_len (the context window is full)"
    else:
        fix = f"raise max_tokens (e.g. max_tokens={max(2 * max_tokens, max_tokens + 64)})"
    return OutputCutOffError(f"{what} was cut off at max_tokens={max_tokens} before it was complete; {fix}")
