"""Engine options: what to load, how to quantize, and the runtime's shapes. Validated on construction."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# "auto" step limits by GPU memory (bytes at least, max_batch_size, max_num_tokens); the last row is the CPU's.
AUTO_LIMITS = ((100 << 30, 1024, 8192), (70 << 30, 512, 8192), (40 << 30, 256, 4096), (0, 64, 2048))


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str = Field(description="Model id, local checkpoint directory, or engine directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    use_fp8: bool = Field(False, description="FP8 (e4m3) weights and activations for every linear layer.")
    quantization: Literal["fp8", "int4"] | None = Field(
        None, description="Weight quantization: 'fp8' (the same as use_fp8=True), 'int4' (W4A16, group-wise 128, "
        "built once and cached), or None. AWQ and GPTQ checkpoints load as INT4 by themselves."
    )
    int4_method: Literal["awq_bounded", "awq_gptq", "awq", "gptq", "rtn"] = Field(
        "awq_bounded", description="INT4 rounding: 'awq_bounded' (AWQ's activation-aware scales + clipping, then "
        "GPTQ error compensation that only chooses each weight's rounding direction), 'awq_gptq' (the same with free "
        "GPTQ rounding), 'awq' (scales + clipping, round-to-nearest), 'gptq' (clipping + GPTQ), or 'rtn' "
        "(round-to-nearest, no calibration)."
    )
    activation_scheme: Literal["static", "dynamic"] = Field(
        "static", description="FP8 activation scales: calibrated per tensor, or computed per token at run time."
    )
    weight_rounding: Literal["gptq", "nearest"] = Field(
        "gptq", description="FP8 weight rounding: error-compensated with calibration data (GPTQ, more accurate), or "
        "round-to-nearest (no calibration needed with activation_scheme='dynamic')."
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="'fp8' stores K/V in e4m3 with scales.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; 'auto' is bfloat16 on a GPU and float32 on the CPU."
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", description="Most sequences in one step; 'auto': from the GPU's memory (1,024 with 100 GiB or more, "
        "512 with 70, 256 with 40, else 64; 64 on the CPU).")
    max_seq_len: int | None = Field(None, ge=16, description="Prompt + output tokens; default: the model's limit.")
    max_num_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] = Field(
        "auto", description="Token budget per step (prefill chunk size); 'auto': 8,192 on a GPU with 70 GiB or more, "
        "4,096 with 40, else 2,048 (and never below max_batch_size).")
    block_size: int = Field(16, ge=1, le=256, description="Tokens per paged KV-cache block.")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; default: from memory.")
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=0.98)
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    engine_process: bool = Field(
        True, description="Run the engine core in its own process (True), so the application's Python threads never "
        "hold the interpreter lock its steps need; False runs it on a thread of this process.")
    calibration_dataset: Any = Field(None, description="Strings, an iterable of strings, or a datasets.Dataset.")
    calibration_samples: int = Field(64, ge=1)
    calibration_max_length: int = Field(512, ge=8)
    allow_pickle_weights: bool = Field(False, description="Load .bin (pickle) weights; unsafe for untrusted files.")
    # Speculative decoding (vLLM's names): see engine/speculation.py.
    speculative: Literal["ngram"] | None = Field(
        None, description="'ngram': prompt-lookup speculative decoding (proposals copied from the prompt and the "
        "output so far, verified in one step; greedy output unchanged); None: plain decoding.")
    num_speculative_tokens: int = Field(8, ge=1, le=64, description="Most tokens proposed per sequence and step.")
    prompt_lookup_max: int = Field(3, ge=1, le=32, description="Longest suffix n-gram looked up for a proposal.")
    prompt_lookup_min: int = Field(1, ge=1, le=32, description="Shortest suffix n-gram that counts as a match.")
    speculative_disable_by_batch_size: int = Field(
        8, ge=1, description="Steps of more sequences than this run plain decoding (and keep asynchronous "
        "scheduling): in a big batch the step is compute-bound and verifying proposals costs throughput.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")

    @model_validator(mode="after")
    def _check_quantization(self) -> "EngineConfig":
        # One meaning, two spellings: use_fp8=True is quantization="fp8".
        if self.use_fp8 and self.quantization == "int4":
            raise ValueError("use_fp8=True and quantization='int4' ask for two weight formats; pass one of them")
        if self.use_fp8 or self.quantization == "fp8":
            self.use_fp8, self.quantization = True, "fp8"
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> "EngineConfig":
        # Every running sequence needs one token of the step budget to decode.
        if "auto" not in (self.max_num_tokens, self.max_batch_size) and self.max_num_tokens < self.max_batch_size:
            raise ValueError(f"max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}); raise max_num_tokens or lower max_batch_size")
        return self

    @model_validator(mode="after")
    def _check_speculative(self) -> "EngineConfig":
        # Only values other than the defaults: a dumped config (all fields given) must load again as it was.
        fields = type(self).model_fields
        options = sorted(name for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                                           "speculative_disable_by_batch_size")
                         if getattr(self, name) != fields[name].default)
        if self.speculative is None and options:
            raise ValueError(f"{', '.join(options)}: options of speculative decoding, which is off; pass "
                             "speculative='ngram' too, or leave them out")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max}); lower prompt_lookup_min or raise prompt_lookup_max")
        if self.speculative is not None and self.max_num_tokens != "auto" and (
                self.num_speculative_tokens >= self.max_num_tokens):
            raise ValueError(f"num_speculative_tokens ({self.num_speculative_tokens}) must be < max_num_tokens "
                             f"({self.max_num_tokens}); lower num_speculative_tokens")
        return self

    def with_limits(self, gpu_memory: int | None) -> "EngineConfig":
        """This config with 'auto' max_batch_size / max_num_tokens resolved for a GPU of gpu_memory bytes (None:
        the CPU), from AUTO_LIMITS."""
        memory = gpu_memory if gpu_memory is not None else -1
        auto_seqs, auto_tokens = next((seqs, tokens) for least, seqs, tokens in AUTO_LIMITS if memory >= least) \
            if memory >= 0 else AUTO_LIMITS[-1][1:]
        seqs = auto_seqs if self.max_batch_size == "auto" else self.max_batch_size
        tokens = max(auto_tokens, seqs) if self.max_num_tokens == "auto" else self.max_num_tokens
        return self.model_copy(update={"max_batch_size": seqs, "max_num_tokens": tokens})
