"""Per-request generation options, validated on construction.

Every invalid value raises a pydantic ``ValidationError`` that names the field, so a bad request fails alone
before it reaches the engine.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .text_checks import check_unicode

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
TOKEN_ID_LIMIT = 2**31  # token ids are int32 on the device


def refuse_bools(value: Any, name: str) -> Any:
    """The value of an integer field (or a list of them), unless it holds True/False: those are not counts or ids
    (pydantic would read them as 1/0: logprobs=True meaning "yes, please" got one top log-probability,
    max_tokens=True one token). A before-validator for SamplingParams and the server's request bodies."""
    if isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)):
        hint = ("; it is how many top log-probabilities to return per token (0 to 20; 0: the sampled token's "
                "only)") if name == "logprobs" else ""
        raise ValueError(f"{name} takes integers, not True/False{hint}")
    return value


class SamplingParams(BaseModel):
    """How to sample one request. Defaults follow transformers/vLLM conventions."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    n: int = Field(1, ge=1, le=64, description="Number of completions for the prompt.")
    max_tokens: int | None = Field(
        256, ge=1, description="Most new tokens; None means up to the context window."
    )
    min_tokens: int = Field(0, ge=0, description="EOS and stop strings are ignored before this many tokens.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens holding this mass."
    )
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10.0, description="> 1 discourages tokens already in the prompt or the output; logits are "
        "divided by it, so it stays >= 0.01."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="> 0 discourages tokens already in the output (OpenAI semantics)."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="> 0 discourages tokens in proportion to their count in the output."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same output, whatever batch it shares.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; matched across tokens, never emitted.")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top log-probabilities per token.")
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | None = Field(
        None, description="A JSON schema the output must satisfy ({} or {'type': 'object'} for any JSON object)."
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=1, description="Keep only the last N prompt tokens instead of failing on an over-long prompt."
    )

    @field_validator("n", "max_tokens", "min_tokens", "top_k", "seed", "stop_token_ids", "logprobs",
                     "truncate_prompt_tokens", mode="before")
    @classmethod
    def _no_bools(cls, value: Any, info) -> Any:
        return refuse_bools(value, info.field_name)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
        for s in value:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters")
            check_unicode(s, "stop")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int]) -> list[int]:
        bad = [t for t in value if not 0 <= t < TOKEN_ID_LIMIT]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids, >= 0 and < 2**31; got {bad[:5]}")
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
