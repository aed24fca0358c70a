"""The server's conversion layer without a server: OpenAI request bodies -> SamplingParams, errors in OpenAI's
shape, log-probabilities in both OpenAI shapes, per-replica engine gauges in /metrics, replica ranking for session
affinity and the stats fan-out, and the core importing without the server's dependencies."""
from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")
from optimum_nvidia_core.request_stream import EngineError  # noqa: E402
from optimum_nvidia_core.server.errors import APIError, from_exception  # noqa: E402
from optimum_nvidia_core.server.logprobs import chat_logprobs, completion_logprobs  # noqa: E402
from optimum_nvidia_core.server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]


def test_chat_request_maps_onto_sampling_params():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": HI, "max_tokens": 10, "max_completion_tokens": 5, "temperature": 0.2, "top_p": 0.5,
        "seed": 3, "n": 2, "stop": "END", "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": True,
        "top_logprobs": 4, "response_format": {"type": "json_object"}, "some_future_field": 1})
    params = req.sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.n) == (5, 0.2, 0.5, 3, 2)
    assert params.stop == ["END"] and params.logprobs == 4 and params.guided_json == {"type": "object"}
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, 0.2)
    defaults = ChatCompletionRequest(messages=HI).sampling_params()
    assert defaults.max_tokens is None and defaults.logprobs is None and defaults.temperature == 1.0
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = ChatCompletionRequest(messages=HI, response_format={"type": "json_schema",
                                                              "json_schema": {"name": "x", "schema": schema}})
    assert req.sampling_params().guided_json == schema
    assert ChatCompletionRequest(messages=HI, logprobs=True).sampling_params().logprobs == 0


def test_stop_token_ids_reach_the_sampling_params_and_bad_ones_are_a_400():
    """vLLM's extra field: dropped silently, a client's stop ids would not stop anything."""
    assert ChatCompletionRequest(messages=HI, stop_token_ids=[7, 9]).sampling_params().stop_token_ids == [7, 9]
    assert CompletionRequest(prompt="a", stop_token_ids=[3]).sampling_params().stop_token_ids == [3]
    assert ChatCompletionRequest(messages=HI).sampling_params().stop_token_ids == []
    for bad in ([-1], [True]):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest(messages=HI, stop_token_ids=bad).sampling_params()
        assert from_exception(info.value).status == 400 and "stop_token_ids" in str(info.value)


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": HI, "temperature": 3}, {"messages": HI, "top_logprobs": 2},
    {"messages": HI, "tool_choice": "required"}, {"messages": HI, "tool_choice": "sometimes", "tools": [{}]},
    {"messages": HI, "response_format": {"type": "json_schema"}}, {"messages": HI, "n": 0},
    {"messages": HI, "max_tokens": True}, {"messages": HI, "n": True}, {"messages": HI, "seed": False},
    {"messages": HI, "logprobs": True, "top_logprobs": True}, {"messages": HI, "stop_token_ids": [True]},
])
def test_bad_chat_bodies_are_rejected_with_the_field_named(body):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = from_exception(info.value)
    assert error.status == 400 and error.message


def test_completion_request_prompts_and_defaults():
    assert CompletionRequest(prompt="a").prompts == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert CompletionRequest(prompt="a").sampling_params().max_tokens == 16  # OpenAI's default
    for bools in ({"prompt": "a", "logprobs": True}, {"prompt": [True, False]}):  # not 1 top logprob, not ids 1, 0
        with pytest.raises(ValidationError, match="takes integers, not True/False"):
            CompletionRequest.model_validate(bools)
    for bad in ({"prompt": "a", "echo": True}, {"prompt": "a", "suffix": "z"}, {"prompt": []}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_errors_have_openai_shape_and_survive_pickling():
    error = APIError(404, "no such model", param="model", code="model_not_found")
    assert error.body() == {"error": {"message": "no such model", "type": "not_found_error", "param": "model",
                                      "code": "model_not_found"}}
    again = pickle.loads(pickle.dumps(error))  # crosses Ray's process boundary intact
    assert (again.status, again.message, again.param, again.code) == (404, "no such model", "model", "model_not_found")
    assert from_exception(ValueError("bad tool")).status == 400
    assert from_exception(EngineError("gone")).status == 503
    hidden = from_exception(KeyError("secret internals"))
    assert hidden.status == 500 and "secret" not in hidden.message

    class Wrapped(Exception):  # what Ray raises: the original exception as ``cause``
        cause = APIError(400, "x")
    assert from_exception(Wrapped()).status == 400


def test_logprobs_in_both_openai_shapes():
    text = {5: "Hel", 6: "lo", 7: "!"}.__getitem__
    lps = [{5: -0.1, 6: -2.0, 7: -3.0}, {6: -0.5, 7: -0.7}]
    content = chat_logprobs([5, 6], lps, 2, text)
    assert [c["token"] for c in content] == ["Hel", "lo"] and content[0]["bytes"] == list(b"Hel")
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hel", "lo"]
    legacy = completion_logprobs([5, 7], [{5: -0.1}, {6: -0.5}], 1, text, offset=10)
    assert legacy["tokens"] == ["Hel", "!"] and legacy["text_offset"] == [10, 13]
    assert legacy["token_logprobs"] == [-0.1, -9999.0] and legacy["top_logprobs"] == [{"Hel": -0.1}, {"lo": -0.5}]


def test_rendezvous_ranking_is_stable_and_spreads_sessions():
    pytest.importorskip("ray")
    from optimum_nvidia_core.server.ray_serve import rank_replicas

    keys = [f"user:{i}" for i in range(400)]
    two = {k: rank_replicas(k, ["a", "b"])[0] for k in keys}
    assert all(rank_replicas(k, ["b", "a"])[0] == two[k] for k in keys)  # order of candidates does not matter
    assert 150 < sum(v == "a" for v in two.values()) < 250
    three = {k: rank_replicas(k, ["a", "b", "c"])[0] for k in keys}
    assert all(three[k] in (two[k], "c") for k in keys)  # a new replica only takes keys, never reshuffles


def test_engine_gauges_are_labelled_by_replica():
    from optimum_nvidia_core.server.metrics import ServerMetrics

    stats = {"r1": {"total_blocks": 100, "free_blocks": 75, "running_requests": 3},
             "r2": {"total_blocks": 100, "free_blocks": 100, "running_requests": 0}}
    text = ServerMetrics().exposition(stats).decode()
    assert 'optimum_nvidia_kv_cache_usage_ratio{replica="r1"} 0.25' in text
    assert 'optimum_nvidia_kv_cache_free_blocks{replica="r2"} 100.0' in text
    assert 'optimum_nvidia_kv_cache_total_blocks{replica="r1"} 100.0' in text
    assert 'optimum_nvidia_engine_running_requests{replica="r1"} 3.0' in text
    assert "optimum_nvidia_requests_running 0.0" in text  # the server's own metrics come first
    assert "kv_cache" not in ServerMetrics().exposition({}).decode()  # no engine up: no engine gauges, no error


def test_stats_calls_go_to_each_replica_once_then_stop():
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from optimum_nvidia_core.server.ray_serve import SessionAffinityRouter

    router = object.__new__(SessionAffinityRouter)  # choose_replicas reads only its arguments
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=i)) for i in ("a", "b", "c")]

    def chosen(**kwargs):
        ranks = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(kwargs=kwargs)))
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    asked = []
    while (choice := chosen(skip=list(asked))[0][0]) not in asked:
        asked.append(choice)
    assert sorted(asked) == ["a", "b", "c"]
    first, rest = chosen(affinity="user:1")  # a request with a session key: its replica, then the others
    assert len(first) == 1 and sorted(first + rest) == ["a", "b", "c"]


def test_the_core_imports_without_the_server_dependencies():
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('fastapi', 'uvicorn', 'prometheus_client', "
            "'starlette', 'ray')]; import optimum_nvidia_core, optimum_nvidia_core.cli, optimum_nvidia_core.server; "
            "from optimum_nvidia_core import LLM, SamplingParams; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_ray_app_builder_parses_serve_run_arguments():
    pytest.importorskip("ray")
    from ray.serve import Application

    from optimum_nvidia_core.server.ray_serve import app_builder

    app = app_builder({"model": "some/model", "replicas": "3", "gpus_per_replica": "0.5", "max_batch_size": "32",
                       "use_fp8": "true"})
    assert isinstance(app, Application)
