"""The seed's drop-in ``AutoModelForCausalLM``: switching from transformers is one changed import line.

    - from transformers import AutoModelForCausalLM
    + from optimum_nvidia_core import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", use_fp8=True)
    generated_ids, generated_length = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True))

``generate`` returns the seed's pair of tensors (on the device of ``input_ids``):
    generated_ids:    LongTensor[batch, n, L]. Row (i, j) is prompt i with its padding removed, followed by its j-th
                      completion (the EOS token included when the model stopped on it), right-padded with
                      ``pad_token_id`` to L, the longest row. n is ``num_return_sequences`` (1 by default; the seed's
                      beam axis). So ``tokenizer.batch_decode(generated_ids[0], skip_special_tokens=True)`` gives the
                      full texts (prompt + completion) of prompt 0, as the seed's README does.
    generated_length: LongTensor[batch, n], the unpadded length of each row (prompt tokens + new tokens).

Every row of a call is submitted to the in-flight runtime at once; rows finish independently. Batches may be padded on
the left (as transformers wants for decoder-only models) or on the right: ``attention_mask`` says which tokens are real.
Generation options follow transformers: what the call does not set comes from the model's generation_config.json, then
from transformers' own defaults (greedy, 20 new tokens, top_k=50 when sampling).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .hub import resolve_model
from .llm import LLM
from .sampling_params import SamplingParams

# transformers' fallbacks for what neither the call nor the model's generation_config sets
# (GenerationConfig._get_default_generation_params in transformers 5). With no max_length nor max_new_tokens set,
# transformers 5 generates DEFAULT_NEW_TOKENS new tokens.
DEFAULT_NEW_TOKENS = 20
HF_GENERATION_DEFAULTS: dict[str, Any] = {
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
    "num_return_sequences": 1,
}
# The generate() options we honour; they are the names transformers uses.
GENERATION_OPTIONS = (
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "num_return_sequences", "seed", "eos_token_id", "pad_token_id", "stop_strings",
)
# Accepted for compatibility with seed/transformers code; they change nothing for single-beam sampling.
IGNORED_OPTIONS = ("bos_token_id", "length_penalty", "use_cache", "num_beams")


class AutoModelForCausalLM:
    """Entry point named like transformers' class; ``from_pretrained`` returns a ``CausalLM``."""

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        use_fp8: bool = False,
        max_batch_size: int | None = None,
        max_prompt_length: int | None = None,
        max_new_tokens: int | None = None,
        max_output_length: int | None = None,
        calibration_dataset: Any = None,
        revision: str | None = None,
        **options: Any,
    ) -> "CausalLM":
        """Load ``model`` (hub id, checkpoint dir, or an engine dir written by ``save_pretrained``).

        ``max_prompt_length`` + ``max_new_tokens`` (or the seed's ``max_output_length``, prompt included) bound the
        context of every sequence; ``max_batch_size`` bounds the sequences per step. Other options go to the engine
        (see ``EngineConfig``: device, dtype, kv_cache_dtype, block_size, ...).
        """
        engine_options = _engine_options(options)
        if max_batch_size is not None:
            engine_options["max_batch_size"] = max_batch_size
        max_seq_len = max_output_length
        if max_seq_len is None and max_prompt_length is not None and max_new_tokens is not None:
            max_seq_len = max_prompt_length + max_new_tokens
        if max_seq_len is not None:
            engine_options["max_seq_len"] = max_seq_len
        llm = LLM(str(model), use_fp8=use_fp8, revision=revision, calibration_dataset=calibration_dataset,
                  **engine_options)
        return CausalLM(llm, read_generation_defaults(model, revision), max_prompt_length, max_new_tokens)


class CausalLM:
    """A causal LM served by the in-flight engine, with transformers' ``generate`` calling convention."""

    def __init__(self, llm: LLM, generation_defaults: dict[str, Any], max_prompt_length: int | None = None,
                 max_new_tokens: int | None = None):
        self.llm = llm
        self.generation_defaults = dict(generation_defaults)  # the model's generation_config.json, as set there
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens  # the default length of an answer, as in the seed

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def max_batch_size(self) -> int:
        return self.llm.config.max_batch_size

    def generate(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> tuple[Any, Any]:
        """Complete every row of ``input_ids`` (LongTensor[batch, T] or [T]); see the module doc for the outputs."""
        import torch

        settings = self.generation_settings(self._given(options))
        rows = unpadded_rows(input_ids, attention_mask)
        self._check_prompt_lengths(rows)
        width = max(len(row) for row in rows) if attention_mask is None else int(torch.as_tensor(input_ids).shape[-1])
        params = [to_sampling_params(settings, width)] * len(rows)
        outputs = self.llm.generate(rows, params)  # all rows enter the running batch together
        sequences = [[row + choice.token_ids for choice in out.choices] for row, out in zip(rows, outputs)]
        ids, lengths = pad_sequences(sequences, self._pad_token_id(settings))
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else None
        return ids.to(device), lengths.to(device)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the engine (weights, scales, tokenizer, generation config); ``from_pretrained(dir)`` loads it."""
        return self.llm.save(save_directory)

    def generation_settings(self, given: dict[str, Any], fallbacks: dict[str, Any] | None = None) -> dict[str, Any]:
        """The call's options over the model's generation_config; ``fallbacks`` (and the ``max_new_tokens`` given to
        from_pretrained) fill what neither sets, as transformers' pipelines add their defaults."""
        set_params = {**self.generation_defaults, **given}
        defaults = dict(fallbacks or {})
        if self.max_new_tokens is not None:
            defaults["max_new_tokens"] = self.max_new_tokens
        added = {k: v for k, v in defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        return {**added, **set_params}

    # ---- internals -------------------------------------------------------------------------------------
    @staticmethod
    def _given(options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(GENERATION_OPTIONS) - set(IGNORED_OPTIONS))
        if unknown:
            raise TypeError(f"generate() got unsupported argument(s) {unknown}; supported: "
                            f"{', '.join(GENERATION_OPTIONS)}")
        if (options.get("num_beams") or 1) > 1:
            raise ValueError("beam search is not supported; use num_beams=1 (sampling or greedy)")
        return {k: v for k, v in options.items() if k in GENERATION_OPTIONS and v is not None}

    def _check_prompt_lengths(self, rows: list[list[int]]) -> None:
        if self.max_prompt_length is None:
            return
        longest = max(len(row) for row in rows)
        if longest > self.max_prompt_length:
            raise ValueError(f"a prompt has {longest} tokens but max_prompt_length is {self.max_prompt_length}; "
                             "shorten it or load the model with a larger max_prompt_length")

    def _pad_token_id(self, settings: dict[str, Any]) -> int:
        tokenizer = self.tokenizer
        for candidate in (settings.get("pad_token_id"), tokenizer.pad_token_id, settings.get("eos_token_id"),
                          tokenizer.eos_token_id):
            if isinstance(candidate, list) and candidate:
                candidate = candidate[0]
            if isinstance(candidate, int):
                return candidate
        return 0


# ---------------------------------------------------------------------------------------- shared helpers


def to_sampling_params(settings: dict[str, Any], prompt_len: int) -> SamplingParams:
    """transformers-style generation settings -> SamplingParams. ``prompt_len`` is what max_length/min_length count
    as the prompt: the padded width of the batch, as in transformers' generate."""
    s = {**HF_GENERATION_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    max_new = s.get("max_new_tokens")
    if max_new is None and s.get("max_length") is None:
        max_new = DEFAULT_NEW_TOKENS
    elif max_new is None:
        max_new = s["max_length"] - prompt_len
        if max_new < 1:
            raise ValueError(f"the prompt has {prompt_len} tokens but max_length is {s['max_length']}; "
                             "pass max_new_tokens=N (or a larger max_length)")
    min_new = s.get("min_new_tokens") or max(0, (s.get("min_length") or 0) - prompt_len)
    sample, n = bool(s["do_sample"]), int(s["num_return_sequences"])
    if n > 1 and not sample:
        raise ValueError(f"greedy decoding gives one answer, so num_return_sequences={n} needs do_sample=True")
    eos, stop = s.get("eos_token_id"), s.get("stop_strings")
    return SamplingParams(
        n=n, max_tokens=max_new, min_tokens=min(min_new, max_new),
        temperature=float(s["temperature"]) if sample else 0.0,
        top_k=int(s["top_k"] or 0) if sample else 0,
        top_p=float(s["top_p"]) if sample else 1.0,
        repetition_penalty=float(s["repetition_penalty"]),
        seed=s.get("seed"),
        stop_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
    )


def read_generation_defaults(model: str | Path, revision: str | None = None) -> dict[str, Any]:
    """The options the model's generation_config.json sets (empty when it has none)."""
    path = Path(model).expanduser()
    model_dir = path if path.is_dir() else resolve_model(str(model), revision)
    config_file = Path(model_dir) / "generation_config.json"
    if not config_file.is_file():
        return {}
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    return {k: v for k, v in settings.items() if k in GENERATION_OPTIONS}


def unpadded_rows(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """LongTensor[batch, T] (or [T], or lists) + optional mask[batch, T] -> the real tokens of each row."""
    import torch

    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens] or [tokens], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        rows = ids.tolist()
    else:
        mask = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
        rows = [row[keep].tolist() for row, keep in zip(ids, mask)]
    if any(not row for row in rows):
        raise ValueError("a row of input_ids has no real token (its attention_mask is all zeros); drop it")
    return rows


def pad_sequences(sequences: list[list[list[int]]], pad_token_id: int) -> tuple[Any, Any]:
    """[batch][n] token lists -> (LongTensor[batch, n, L] right-padded, LongTensor[batch, n] lengths)."""
    import torch

    batch, n = len(sequences), max(len(choices) for choices in sequences)
    longest = max(len(seq) for choices in sequences for seq in choices)
    ids = torch.full((batch, n, longest), pad_token_id, dtype=torch.long)
    lengths = torch.zeros((batch, n), dtype=torch.long)
    for i, choices in enumerate(sequences):
        for j, seq in enumerate(choices):
            ids[i, j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths[i, j] = len(seq)
    return ids, lengths


def _engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """transformers-style loading options -> EngineConfig options (anything else is passed on and validated)."""
    options = dict(options)
    if options.pop("trust_remote_code", False):
        raise ValueError("remote code is never run: only the LLaMA family is supported; drop trust_remote_code=True")
    for name in ("torch_dtype", "dtype"):
        value = options.pop(name, None)
        if value is not None:
            options["dtype"] = str(value).removeprefix("torch.")
    if isinstance(options.get("device"), int):  # transformers pipelines: -1 is the CPU, N is cuda:N
        options["device"] = "cpu" if options["device"] < 0 else f"cuda:{options['device']}"
    device_map = options.pop("device_map", None)
    if device_map is not None:
        if not isinstance(device_map, str):
            raise ValueError("device_map must be 'auto', 'cpu', 'cuda' or 'cuda:N' (the engine runs on one device)")
        options.setdefault("device", device_map)
    if "num_calibration_samples" in options:  # the seed's name
        options["calibration_samples"] = options.pop("num_calibration_samples")
    return options
