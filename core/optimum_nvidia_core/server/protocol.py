"""The OpenAI request bodies the server accepts, as pydantic models, and their mapping onto ``SamplingParams``.

Unknown fields are ignored (as OpenAI's own server and vLLM do), so newer clients keep working; known fields are
validated, and a bad value becomes a 400 that names the field. Messages pass through as dicts: the core's chat
code validates them and owns templates and tool formats.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling_params import SamplingParams, refuse_bools


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema: {'name': ..., 'schema': {...}}")
        return self

    def guided_json(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_  # type: ignore[union-attr]
        return None


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Also the session key for replica affinity.")
    # vLLM-style extensions that OpenAI-compatible clients send through extra_body
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a completion (as vLLM).")
    # Known OpenAI fields that change the answer and that this server does not implement: refused when set, never
    # silently dropped (an ignored logit_bias would still produce the tokens it bans).
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    @field_validator("n", "max_tokens", "seed", "top_k", "min_tokens", "stop_token_ids", "best_of", mode="before")
    @classmethod
    def _no_bools(cls, value: Any, info) -> Any:  # before pydantic reads true as 1
        return refuse_bools(value, info.field_name)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "_GenerationRequest":
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported by this server (each of the n={self.n} "
                             "completions is returned); leave it out")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _common_params(self, max_tokens: int | None, logprobs: int | None,
                       guided_json: dict[str, Any] | None) -> SamplingParams:
        options: dict[str, Any] = dict(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop, logprobs=logprobs,
            guided_json=guided_json, ignore_eos=self.ignore_eos,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop_token_ids"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return SamplingParams(**options)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("max_completion_tokens", "top_logprobs", mode="before")
    @classmethod
    def _no_bools_here(cls, value: Any, info) -> Any:
        return refuse_bools(value, info.field_name)

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', "
                             f"'function': {{'name': ...}}}}, got {self.tool_choice!r}")
        if self.tool_choice not in (None, "auto", "none") and not self.tools:
            raise ValueError(f"tool_choice={self.tool_choice!r} needs tools")
        return self

    def sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        guided = self.response_format.guided_json() if self.response_format else None
        return self._common_params(self.max_completion_tokens or self.max_tokens, logprobs, guided)

    def affinity_text(self) -> str:
        """The part of the conversation that stays the same across one agent's turns: its first two messages."""
        return repr([m.get("content") for m in self.messages[:2]])


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] = Field(description="One prompt; a list of strings is n prompts.")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", "logprobs", mode="before")
    @classmethod
    def _no_bools_here(cls, value: Any, info) -> Any:
        return refuse_bools(value, info.field_name)

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo=true is not supported; send the prompt text yourself")
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return list(self.prompt)  # type: ignore[arg-type]
        return [self.prompt]  # type: ignore[list-item]

    def sampling_params(self) -> SamplingParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions
        return self._common_params(max_tokens, self.logprobs, None)

    def affinity_text(self) -> str:
        return str(self.prompts[0])[:512]
