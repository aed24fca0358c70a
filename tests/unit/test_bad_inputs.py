"""Bad inputs: each gets one clear error that names the problem and the fix, and the engine keeps serving.

Every case here is one row of the table in README.md (same ids). A case is (id, action, error type, regex
the message must match); the action gets the shared tiny-model LLM and a scratch directory. After each case the
same engine must still answer a good request."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.hub import ModelResolutionError

MAX_SEQ_LEN = 64
GOOD = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
USER = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object", "properties": {
                                                      "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=MAX_SEQ_LEN)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _tool(name="get_weather", parameters=None, description="Weather of a city"):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}} if parameters is None else parameters
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _copy_model(model_dir: Path, tmp: Path, name: str) -> Path:
    target = tmp / name
    shutil.copytree(model_dir, target)
    return target


def _pickled_model(model_dir: Path, tmp: Path) -> Path:
    """The tiny model with its weights as a pickle .bin only."""
    from safetensors.torch import load_file

    target = _copy_model(model_dir, tmp, "pickled")
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def _gpt2_model(model_dir: Path, tmp: Path) -> Path:
    target = _copy_model(model_dir, tmp, "gpt2")
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (target / "config.json").write_text(json.dumps(config))
    return target


def _no_config_model(model_dir: Path, tmp: Path) -> Path:
    target = _copy_model(model_dir, tmp, "no_config")
    (target / "config.json").unlink()
    return target


def _fp8_on_a100(llm, tmp, monkeypatch, model_dir):
    # A GPU without FP8 (A100, compute capability 8.0), faked: the check must refuse before anything touches CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    LLM(str(model_dir), use_fp8=True, device="cuda", engine_process=False)  # the fakes live in this process


def _bad_config_model(model_dir: Path, tmp: Path, **changes) -> Path:
    target = _copy_model(model_dir, tmp, "bad_config")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def _list_config_model(model_dir: Path, tmp: Path) -> Path:
    target = _copy_model(model_dir, tmp, "list_config")
    (target / "config.json").write_text("[1, 2]")
    return target


def _chat_with_template(model_dir: Path, tmp: Path, template: str | None):
    """Chat on a copy of the model whose chat template is ``template`` (None: no template at all)."""
    target = _copy_model(model_dir, tmp, "template")
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (target / name).unlink(missing_ok=True)
    if template is not None:
        (target / "chat_template.jinja").write_text(template)
    other = LLM(str(target), device="cpu", max_seq_len=MAX_SEQ_LEN)
    try:
        other.chat(USER, GOOD)
    finally:
        other.shutdown()


def _small_kv_cache(model_dir: Path, max_tokens: int):
    """4 KV blocks of 16 tokens (64 in all) under max_seq_len 512: max_tokens must fit the cache, up front."""
    small = LLM(str(model_dir), device="cpu", num_kv_blocks=4, block_size=16, max_seq_len=512)
    try:
        _stream(small, [5, 6, 7], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    finally:
        small.shutdown()


def _cuda_without_cuda(llm, tmp, monkeypatch, model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    LLM(str(model_dir), device="cuda", engine_process=False)  # the fake lives in this process


def _stream(llm, prompt, params):
    """Submit and read the whole stream: errors found on the engine thread surface here."""
    return list(llm.stream(prompt, params))


# (id, action(llm, tmp_path, monkeypatch, model_dir), error type, message regex)
CASES = [
    # ---- prompts
    ("prompt_too_long_tokens", lambda llm, *_: llm.generate([[5] * 80], GOOD),
     ValueError, r"prompt has 80 tokens but max_seq_len is 64.*truncate_prompt_tokens"),
    ("prompt_too_long_text", lambda llm, *_: llm.generate(["Paris is the capital of France. " * 40], GOOD),
     ValueError, r"prompt has \d+ tokens but max_seq_len is 64.*shorten it"),
    ("empty_prompt_text", lambda llm, *_: llm.generate([""], GOOD), ValueError, r"prompt is empty"),
    ("empty_prompt_token_list", lambda llm, *_: llm.generate([[]], GOOD), ValueError, r"prompt is empty"),
    ("token_id_out_of_vocab", lambda llm, *_: llm.generate([[1, 99999]], GOOD),
     ValueError, r"token ids must be ints in \[0, 512\); got \[99999\]"),
    ("negative_token_id", lambda llm, *_: llm.generate([[1, -3]], GOOD),
     ValueError, r"token ids must be ints in \[0, 512\); got \[-3\]"),
    ("non_int_token_ids", lambda llm, *_: llm.generate([[1, "a", 2.5]], GOOD),
     ValueError, r"token ids must be ints .*got \['a', 2.5\]"),
    ("prompt_wrong_type", lambda llm, *_: llm.generate([None], GOOD),
     TypeError, r"prompt must be a str or a list of token ids, got NoneType"),
    ("prompts_as_a_generator", lambda llm, *_: llm.generate(p for p in ["Hi", "Hello"]),
     TypeError, r"prompts is a generator; generate needs a list .*pass list\(prompts\)"),
    ("prompts_wrong_type", lambda llm, *_: llm.generate(None, GOOD),
     TypeError, r"prompts must be a str, a list of token ids, or a list of those; got NoneType"),
    ("lone_surrogate_in_prompt", lambda llm, *_: llm.generate(["ab\ud800cd"], GOOD),
     ValueError, r"lone surrogate at index 2"),
    # ---- chat messages
    ("empty_messages", lambda llm, *_: llm.chat([], GOOD), ValueError, r"messages is empty; pass at least one"),
    ("messages_as_one_dict", lambda llm, *_: llm.chat(USER[0], GOOD),
     TypeError, r"messages must be a list of messages, got one dict; wrap it in a list: \[message\]"),
    ("messages_as_a_generator", lambda llm, *_: llm.chat((m for m in USER), GOOD),
     TypeError, r"messages must be a list of dicts .*got generator; pass list\(messages\)"),
    ("no_chat_template", lambda llm, tmp, mp, model_dir: _chat_with_template(model_dir, tmp, None),
     ValueError, r"no chat template .*add a chat_template.jinja file to the model's directory, or call LLM.generate"),
    ("chat_template_syntax_error", lambda llm, tmp, mp, model_dir: _chat_with_template(
        model_dir, tmp, "{% for message in messages %}{{ message['content'] }}"),
     ValueError, r"chat template is not valid Jinja \(line 1: .*\); fix chat_template in the model's"),
    ("message_not_a_dict", lambda llm, *_: llm.chat(["Hi"], GOOD),
     ValueError, r"message 0 must be a dict with 'role' and 'content'"),
    ("unknown_role", lambda llm, *_: llm.chat([{"role": "wizard", "content": "Hi"}], GOOD),
     ValueError, r"unknown role 'wizard'; use one of system, user, assistant, tool"),
    ("non_text_content_part", lambda llm, *_: llm.chat(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}], GOOD),
     ValueError, r"content part of type 'image_url'; this model reads text only"),
    ("content_wrong_type", lambda llm, *_: llm.chat([{"role": "user", "content": 42}], GOOD),
     ValueError, r"content of type int; pass a string or a list of"),
    ("lone_surrogate_in_messages", lambda llm, *_: llm.chat([{"role": "user", "content": "x\udc80"}], GOOD),
     ValueError, r"message 0 \(user\) contains a lone surrogate at index 1"),
    ("tool_call_arguments_not_json", lambda llm, *_: llm.chat(USER + [{"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": "{city: Paris"}}]}], GOOD),
     ValueError, r"arguments that are not valid JSON"),
    # ---- tools
    ("invalid_tool_schema", lambda llm, *_: llm.chat(USER, GOOD, tools=[_tool(parameters={
        "type": "object", "properties": {"city": {"type": "town"}}})]),
     ValueError, r"parameters schema of tool 'get_weather' cannot be compiled into a grammar"),
    ("tool_parameters_not_an_object", lambda llm, *_: llm.chat(USER, GOOD, tools=[_tool(parameters={
        "type": "string"})]),
     ValueError, r"tool 'get_weather': parameters must be a JSON schema of type 'object'"),
    ("invalid_tool_name", lambda llm, *_: llm.chat(USER, GOOD, tools=[_tool(name="get weather!")]),
     ValueError, r"invalid name 'get weather!'; use 1-64 letters"),
    ("duplicate_tool_names", lambda llm, *_: llm.chat(USER, GOOD, tools=[_tool(), _tool()]),
     ValueError, r"two tools are named 'get_weather'"),
    ("lone_surrogate_in_tool_description", lambda llm, *_: llm.chat(
        USER, GOOD, tools=[_tool(description="bad \ud800")]),
     ValueError, r"description contains a lone surrogate"),
    ("unknown_tool_in_tool_choice", lambda llm, *_: llm.chat(USER, GOOD, tools=[WEATHER_TOOL],
                                                            tool_choice="get_time"),
     ValueError, r"tool_choice names the tool 'get_time', which is not among the tools \['get_weather'\]"),
    ("tool_choice_without_tools", lambda llm, *_: llm.chat(USER, GOOD, tool_choice="required"),
     ValueError, r"tool_choice='required' needs tools; pass tools=\[...\]"),
    # ---- sampling parameters
    ("negative_temperature", lambda *_: SamplingParams(temperature=-0.5),
     ValidationError, r"temperature\n.*greater than or equal to 0"),
    ("nan_temperature", lambda *_: SamplingParams(temperature=float("nan")),
     ValidationError, r"temperature\n.*finite number"),
    ("top_p_above_1", lambda *_: SamplingParams(top_p=1.5), ValidationError, r"top_p\n.*less than or equal to 1"),
    ("top_p_zero", lambda *_: SamplingParams(top_p=0.0), ValidationError, r"top_p\n.*greater than 0"),
    ("negative_top_k", lambda *_: SamplingParams(top_k=-1), ValidationError, r"top_k\n.*greater than or equal to 0"),
    ("max_tokens_zero", lambda *_: SamplingParams(max_tokens=0),
     ValidationError, r"max_tokens\n.*greater than or equal to 1"),
    ("max_tokens_negative", lambda *_: SamplingParams(max_tokens=-5),
     ValidationError, r"max_tokens\n.*greater than or equal to 1"),
    ("max_tokens_beyond_context", lambda llm, *_: llm.generate([[5, 6, 7]], SamplingParams(max_tokens=500)),
     ValueError, r"max_tokens=500 does not fit: the prompt has 3 tokens and max_seq_len is 64, leaving room for 61"),
    ("min_tokens_above_max_tokens", lambda *_: SamplingParams(min_tokens=10, max_tokens=5),
     ValidationError, r"min_tokens \(10\) must be <= max_tokens \(5\)"),
    ("ten_thousand_stop_strings", lambda *_: SamplingParams(stop=[f"s{i}" for i in range(10_000)]),
     ValidationError, r"at most 64 stop strings are allowed, got 10000"),
    ("empty_stop_string", lambda *_: SamplingParams(stop=[""]), ValidationError, r"stop strings must be non-empty"),
    ("huge_stop_string", lambda *_: SamplingParams(stop=["x" * 10_000]),
     ValidationError, r"stop string may have at most 256 characters"),
    ("lone_surrogate_in_stop", lambda *_: SamplingParams(stop=["end\udfff"]),
     ValidationError, r"stop contains a lone surrogate at index 3"),
    ("stop_token_id_beyond_vocab", lambda llm, *_: llm.generate([[5, 6, 7]], SamplingParams(
        max_tokens=4, min_tokens=2, stop_token_ids=[100000])),
     ValueError, r"stop_token_ids must be token ids of this model, in \[0, 512\); got \[100000\]"),
    ("stop_token_id_beyond_int32", lambda *_: SamplingParams(stop_token_ids=[2**64], min_tokens=2),
     ValidationError, r"stop_token_ids\n.*>= 0 and < 2\*\*31; got \[18446744073709551616\]"),
    ("negative_stop_token_id", lambda *_: SamplingParams(stop_token_ids=[-1]),
     ValidationError, r"stop_token_ids\n.*>= 0 and < 2\*\*31; got \[-1\]"),
    ("tiny_repetition_penalty", lambda *_: SamplingParams(repetition_penalty=1e-45),
     ValidationError, r"repetition_penalty\n.*greater than or equal to 0.01"),
    ("max_tokens_beyond_kv_cache", lambda llm, tmp, mp, model_dir: _small_kv_cache(model_dir, max_tokens=100),
     ValueError, r"max_tokens=100 does not fit in the KV cache: it holds 64 tokens and the prompt has 3, leaving "
                 r"room for 61; lower max_tokens.*num_kv_blocks"),
    ("n_zero", lambda *_: SamplingParams(n=0), ValidationError, r"\nn\n.*greater than or equal to 1"),
    ("n_too_large", lambda *_: SamplingParams(n=1000), ValidationError, r"\nn\n.*less than or equal to 64"),
    ("negative_seed", lambda *_: SamplingParams(seed=-1), ValidationError, r"seed\n.*greater than or equal to 0"),
    ("logprobs_above_20", lambda *_: SamplingParams(logprobs=21),
     ValidationError, r"logprobs\n.*less than or equal to 20"),
    ("truncate_prompt_tokens_zero", lambda *_: SamplingParams(truncate_prompt_tokens=0),
     ValidationError, r"truncate_prompt_tokens\n.*greater than or equal to 1"),
    ("unknown_sampling_option", lambda *_: SamplingParams(max_new_tokens=5),
     ValidationError, r"max_new_tokens\n.*Extra inputs are not permitted"),
    ("guided_json_not_a_dict", lambda *_: SamplingParams(guided_json='{"type": "object"}'),
     ValidationError, r"guided_json\n.*valid dictionary"),
    ("guided_json_invalid_schema", lambda llm, *_: _stream(llm, [5, 6, 7], SamplingParams(
        max_tokens=4, guided_json={"type": "object", "properties": {"a": {"type": "nonsense"}}})),
     ValueError, r"guided_json cannot be compiled into a grammar: .*nonsense.*fix the schema"),
    ("guided_json_unsatisfiable", lambda llm, *_: _stream(llm, [5, 6, 7], SamplingParams(
        max_tokens=4, guided_json={"type": "integer", "minimum": 5, "maximum": 2})),
     ValueError, r"guided_json cannot be compiled into a grammar: .*minimum greater than maximum"),
    ("params_wrong_type", lambda llm, *_: llm.generate(["Hi"], {"max_tokens": 5}),
     TypeError, r"params must be a SamplingParams or a list of them, got dict"),
    ("params_count_mismatch", lambda llm, *_: llm.generate(["a", "b", "c"], [GOOD, GOOD]),
     ValueError, r"got 2 SamplingParams for 3 prompts; pass one, or one per prompt"),
    # ---- models and engine options
    ("model_dir_without_config", lambda llm, tmp, mp, model_dir: LLM(str(_no_config_model(model_dir, tmp)),
                                                                      device="cpu"),
     ModelResolutionError, r"No config.json in .*Pass the directory of a Hugging Face checkpoint"),
    ("config_negative_vocab_size", lambda llm, tmp, mp, model_dir: LLM(str(_bad_config_model(
        model_dir, tmp, vocab_size=-5)), device="cpu"),
     ModelResolutionError, r"config.json: vocab_size must be a positive integer, got -5. Fix it"),
    ("config_zero_attention_heads", lambda llm, tmp, mp, model_dir: LLM(str(_bad_config_model(
        model_dir, tmp, num_attention_heads=0)), device="cpu"),
     ModelResolutionError, r"config.json: num_attention_heads must be a positive integer, got 0"),
    ("config_zero_max_position_embeddings", lambda llm, tmp, mp, model_dir: LLM(str(_bad_config_model(
        model_dir, tmp, max_position_embeddings=0)), device="cpu"),
     ModelResolutionError, r"config.json: max_position_embeddings must be a positive integer, got 0"),
    ("config_heads_not_a_multiple_of_kv_heads", lambda llm, tmp, mp, model_dir: LLM(str(_bad_config_model(
        model_dir, tmp, num_key_value_heads=3)), device="cpu"),
     ModelResolutionError, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ("config_is_a_json_list", lambda llm, tmp, mp, model_dir: LLM(str(_list_config_model(model_dir, tmp)),
                                                                   device="cpu"),
     ModelResolutionError, r"config.json holds a JSON list, not an object of model settings"),
    ("pickle_weights", lambda llm, tmp, mp, model_dir: LLM(str(_pickled_model(model_dir, tmp)), device="cpu"),
     ModelResolutionError, r"only in pickle \.bin files .*refused.*allow_pickle_weights=True"),
    ("unsupported_architecture", lambda llm, tmp, mp, model_dir: LLM(str(_gpt2_model(model_dir, tmp)),
                                                                      device="cpu"),
     ModelResolutionError, r"Unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"),
    ("path_traversal_model_id", lambda *_: LLM("../../../no/such/model", device="cpu"),
     ModelResolutionError, r"does not exist or is not a directory"),
    ("traversal_inside_repo_id", lambda *_: LLM("owner/../../secrets", device="cpu"),
     ModelResolutionError, r"does not exist or is not a directory|not a valid Hugging Face repo id"),
    ("malformed_repo_id", lambda *_: LLM("owner/name/extra", device="cpu"),
     ModelResolutionError, r"neither an existing directory nor a valid Hugging Face repo id"),
    ("empty_model_id", lambda *_: LLM("", device="cpu"), ModelResolutionError, r"model id is empty"),
    ("revision_traversal", lambda *_: LLM("owner/name", revision="../../x", device="cpu"),
     ModelResolutionError, r"Invalid revision '../../x'"),
    ("fp8_on_gpu_without_fp8", _fp8_on_a100,
     RuntimeError, r"FP8 needs a GPU of compute capability 8.9 or newer.*A100.* is 8.0.*use_fp8=False"),
    ("cuda_without_cuda", _cuda_without_cuda,
     RuntimeError, r"device='cuda' was asked for but CUDA is not available; use device='cpu'"),
    ("unknown_device", lambda llm, tmp, mp, model_dir: LLM(str(model_dir), device="tpu"),
     ValidationError, r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("max_seq_len_too_small", lambda llm, tmp, mp, model_dir: LLM(str(model_dir), device="cpu", max_seq_len=4),
     ValidationError, r"max_seq_len\n.*greater than or equal to 16"),
    ("token_budget_below_batch", lambda llm, tmp, mp, model_dir: LLM(str(model_dir), device="cpu",
                                                                      max_batch_size=64, max_num_tokens=32),
     ValidationError, r"max_num_tokens \(32\) must be >= max_batch_size \(64\)"),
    ("unknown_engine_option", lambda llm, tmp, mp, model_dir: LLM(str(model_dir), device="cpu", max_batch=8),
     ValidationError, r"max_batch\n.*Extra inputs are not permitted"),
    ("unknown_dtype", lambda llm, tmp, mp, model_dir: LLM(str(model_dir), device="cpu", dtype="int4"),
     ValidationError, r"dtype\n.*'auto', 'bfloat16', 'float16' or 'float32'"),
]

# Behaviours that are wrong today (a fix is needed in a file this suite does not own); the lead removes the mark
# once fixed. strict=True: the moment the fix lands, the xfail turns into a failure that says so.
KNOWN_GAPS: dict[str, str] = {}


def _case_params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[case[0]])] if case[0] in KNOWN_GAPS else []
        yield pytest.param(*case[1:], id=case[0], marks=marks)


@pytest.mark.parametrize("action, error, message", list(_case_params()))
def test_bad_input_fails_alone_with_a_clear_message(llm, model_dir, tmp_path, monkeypatch, action, error, message):
    with pytest.raises(error, match=message):
        action(llm, tmp_path, monkeypatch, model_dir)
    monkeypatch.undo()  # a faked CUDA must not outlive the case
    out = llm.generate([[5, 6, 7]], GOOD)[0]  # the same engine still serves a good request
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_the_table_lists_every_case():
    table = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [case[0] for case in CASES if f"`{case[0]}`" not in table]
    assert not missing, f"README.md has no row for {missing}"
    assert len(CASES) >= 30


def test_an_unsatisfiable_request_inside_a_batch_fails_alone(llm):
    """Bad requests submitted in the middle of good ones: the good ones finish unchanged."""
    prompts = [[5 + i, 9, 11 + i] for i in range(4)]
    expected = [llm.generate([p], GOOD)[0].token_ids for p in prompts]
    good = [llm.stream(p, GOOD) for p in prompts[:2]]
    with pytest.raises(ValueError, match="cannot be compiled"):  # at submit, or at the latest on the stream
        _stream(llm, [5, 6, 7], SamplingParams(max_tokens=4, guided_json={"type": "object", "properties": {
            "a": {"type": "nonsense"}}}))
    good += [llm.stream(p, GOOD) for p in prompts[2:]]
    assert [[t for d in s for t in d.token_ids] for s in good] == expected
