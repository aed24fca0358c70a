"""The seed's drop-in ``pipeline``: transformers' text-generation call contract on the in-flight engine.

    - from transformers.pipelines import pipeline
    + from optimum_nvidia_core.pipelines import pipeline

    pipe = pipeline("text-generation", "HuggingFaceTB/SmolLM2-135M-Instruct", use_fp8=True)
    pipe("Describe a real-world application of AI in sustainable energy.")

Inputs and outputs are those of transformers 5's TextGenerationPipeline:
    str               -> [{"generated_text": str}, ...]            one dict per num_return_sequences
    list[str]         -> [[{"generated_text": str}, ...], ...]     one list per prompt
    chat (messages)   -> [{"generated_text": messages + [assistant message]}, ...]
    list of chats     -> [[{...}, ...], ...]
``return_full_text=False`` keeps only the new text; ``return_tensors=True`` gives ``generated_token_ids`` (prompt +
completion) instead. Defaults match transformers: what the call does not set comes from the model's
generation_config, then from the pipeline's (max_new_tokens=256, do_sample=True, temperature=0.7). Every prompt of a
call is submitted to the engine at once, so a list runs as one in-flight batch.
"""
from __future__ import annotations

import enum
from typing import Any

from .modeling import GENERATION_OPTIONS, IGNORED_OPTIONS, AutoModelForCausalLM, CausalLM, to_sampling_params

SUPPORTED_TASKS = ("text-generation",)
# transformers' TextGenerationPipeline._default_generation_config: applied where the model and the call set nothing.
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
PREPROCESS_OPTIONS = ("prefix", "add_special_tokens", "continue_final_message", "handle_long_generation", "tools",
                      "documents")
POSTPROCESS_OPTIONS = ("return_full_text", "return_tensors", "return_text", "return_type",
                       "clean_up_tokenization_spaces", "skip_special_tokens")
CALL_OPTIONS = (GENERATION_OPTIONS + IGNORED_OPTIONS + PREPROCESS_OPTIONS + POSTPROCESS_OPTIONS
                + ("stop_sequence", "batch_size"))


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


def pipeline(task: str = "text-generation", model: Any = None, tokenizer: Any = None, *, use_fp8: bool = False,
             **kwargs: Any) -> "TextGenerationPipeline":
    """Build a text-generation pipeline on ``model`` (hub id, checkpoint or engine dir, or a loaded ``CausalLM``).

    Generation options given here (max_new_tokens, do_sample, ...) become the defaults of every call; the others go
    to the engine (max_batch_size, max_seq_len, device, dtype, kv_cache_dtype, calibration_dataset, ...).
    """
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"task {task!r} is not supported; use one of {SUPPORTED_TASKS}")
    from .hub import DEFAULT_MODEL

    call_defaults = {k: kwargs.pop(k) for k in list(kwargs) if k in CALL_OPTIONS}
    if isinstance(model, CausalLM):
        if kwargs or use_fp8:
            raise ValueError(f"engine options {sorted(kwargs) + (['use_fp8'] if use_fp8 else [])} cannot apply to "
                             "an already loaded model; pass them to AutoModelForCausalLM.from_pretrained instead")
        causal_lm = model
    else:
        causal_lm = AutoModelForCausalLM.from_pretrained(model or DEFAULT_MODEL, use_fp8=use_fp8, **kwargs)
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(causal_lm, tokenizer or causal_lm.tokenizer, call_defaults)


class TextGenerationPipeline:
    """Callable like transformers' TextGenerationPipeline; see the module doc for inputs and outputs."""

    task = "text-generation"

    def __init__(self, model: CausalLM, tokenizer: Any, call_defaults: dict[str, Any] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.call_defaults = dict(call_defaults or {})

    def __call__(self, text_inputs: Any, **kwargs: Any) -> list:
        options = {**self.call_defaults, **kwargs}
        unknown = sorted(set(options) - set(CALL_OPTIONS))
        if unknown:
            raise TypeError(f"text-generation pipeline got unsupported argument(s) {unknown}; supported: "
                            f"{', '.join(CALL_OPTIONS)}")
        batched, items = _as_batch(text_inputs)
        settings = self._generation_settings(options)
        prompts = [self._tokenize(item, options) for item in items]
        prompts = [self._fit(ids, settings, options) for ids in prompts]
        params = [to_sampling_params(settings, len(ids)) for ids in prompts]
        outputs = self.model.llm.generate(prompts, params)  # one in-flight batch for the whole call
        return_type = _return_type(options)
        records = [
            [self._record(item, ids, choice.token_ids, return_type, options) for choice in out.choices]
            for item, ids, out in zip(items, prompts, outputs)
        ]
        return records if batched else records[0]

    # ---- preprocessing ---------------------------------------------------------------------------------
    def _generation_settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """The call's options over the model's generation_config, then the pipeline defaults where unset."""
        if (options.get("num_beams") or 1) > 1:
            raise ValueError("beam search is not supported; use num_beams=1 (sampling or greedy)")
        given = {k: v for k, v in options.items() if k in GENERATION_OPTIONS and v is not None}
        if options.get("stop_sequence"):
            given["stop_strings"] = options["stop_sequence"]
        return self.model.generation_settings(given, PIPELINE_DEFAULTS)

    def _tokenize(self, item: Any, options: dict[str, Any]) -> list[int]:
        if isinstance(item, str):
            extra = {} if options.get("add_special_tokens") is None else {
                "add_special_tokens": options["add_special_tokens"]}
            return list(self.tokenizer(options.get("prefix", "") + item, **extra)["input_ids"])
        cont = _continues_final_message(item, options)
        encoded = self.tokenizer.apply_chat_template(
            item, add_generation_prompt=not cont, continue_final_message=cont, tools=options.get("tools"),
            documents=options.get("documents"), tokenize=True, return_dict=True,
        )
        return list(encoded["input_ids"])

    def _fit(self, ids: list[int], settings: dict[str, Any], options: dict[str, Any]) -> list[int]:
        """handle_long_generation='hole': drop the prompt's oldest tokens so the new ones fit the context."""
        mode = options.get("handle_long_generation")
        if mode is None:
            return ids
        if mode != "hole":
            raise ValueError(f"handle_long_generation must be None or 'hole', got {mode!r}")
        new_tokens = to_sampling_params(settings, len(ids)).max_tokens or 0
        keep = self.model.llm.max_seq_len - new_tokens
        if keep <= 0:
            raise ValueError(f"max_new_tokens={new_tokens} leaves no room for the prompt in the context of "
                             f"{self.model.llm.max_seq_len} tokens; lower max_new_tokens")
        return ids[-keep:]

    # ---- postprocessing --------------------------------------------------------------------------------
    def _record(self, item: Any, prompt_ids: list[int], new_ids: list[int], return_type: ReturnType,
                options: dict[str, Any]) -> dict[str, Any]:
        if return_type == ReturnType.TENSORS:
            return {"generated_token_ids": prompt_ids + new_ids}
        text = self.tokenizer.decode(
            new_ids, skip_special_tokens=options.get("skip_special_tokens", True),
            clean_up_tokenization_spaces=options.get("clean_up_tokenization_spaces"),
        )
        if return_type == ReturnType.NEW_TEXT:
            return {"generated_text": text}
        if isinstance(item, str):
            return {"generated_text": item + text}
        messages = list(item)
        if _continues_final_message(item, options):
            last = messages[-1]
            return {"generated_text": messages[:-1] + [{**last, "content": last["content"] + text}]}
        return {"generated_text": messages + [{"role": "assistant", "content": text}]}


# ---------------------------------------------------------------------------------------------- helpers


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(m, dict) and "role" in m for m in value)


def _as_batch(text_inputs: Any) -> tuple[bool, list]:
    """(was it a batch?, the items): an item is a prompt string or one chat (a list of message dicts)."""
    if isinstance(text_inputs, str) or _is_chat(text_inputs):
        return False, [text_inputs]
    if isinstance(text_inputs, (list, tuple)) and all(isinstance(x, str) or _is_chat(x) for x in text_inputs):
        return True, list(text_inputs)
    raise TypeError("text-generation inputs must be a string, a list of strings, a chat (a list of message dicts "
                    f"with 'role' and 'content') or a list of chats; got {type(text_inputs).__name__}")


def _continues_final_message(chat: list[dict], options: dict[str, Any]) -> bool:
    value = options.get("continue_final_message")
    return chat[-1]["role"] == "assistant" if value is None else bool(value)


def _return_type(options: dict[str, Any]) -> ReturnType:
    """transformers' rules: return_full_text / return_tensors / return_text are mutually exclusive."""
    if options.get("return_type") is not None:
        return ReturnType(options["return_type"].value if isinstance(options["return_type"], enum.Enum)
                          else options["return_type"])
    full, tensors, text = (options.get(k) for k in ("return_full_text", "return_tensors", "return_text"))
    if full is not None:
        if text is not None or tensors is not None:
            raise ValueError("return_full_text is mutually exclusive with return_text and return_tensors")
        return ReturnType.FULL_TEXT if full else ReturnType.NEW_TEXT
    if tensors is not None:
        if text is not None:
            raise ValueError("return_text is mutually exclusive with return_tensors")
        return ReturnType.TENSORS if tensors else ReturnType.FULL_TEXT
    return ReturnType.FULL_TEXT
