"""`optimum-nvidia serve` against the real `openai` SDK (sync, async, streaming, tools, parse), every error status,
metrics, and 200 concurrent streams with clients hanging up — on a live server on 127.0.0.1 with SmolLM2."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from live_server import LiveServer
from optimum_nvidia_core.hub import DEFAULT_MODEL
from optimum_nvidia_core.server.local_engine import LocalEngine

KEY = "sk-test-0123456789"
MODEL = DEFAULT_MODEL
HI = [{"role": "user", "content": "Name three colors."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(description="the city's name")
    country: str = Field(description="the country the city is in")


@pytest.fixture(scope="module")
def server():
    engine = LocalEngine(MODEL, device="cpu", max_batch_size=128, max_num_tokens=2048)
    with LiveServer(engine, api_key=KEY, max_body_bytes=256 * 1024) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def wait_idle(server, timeout: float = 60.0) -> dict:
    """The engine's stats once nothing runs; every KV block must be free again (the prefix cache's are)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.engine.llm.stats()
        if stats["running_requests"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            return stats
        assert time.monotonic() < deadline, f"requests or KV blocks leaked: {stats}"
        time.sleep(0.1)


# ---- the openai SDK --------------------------------------------------------------------------------------------
def test_chat_stream_matches_whole_answer_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == 24 or whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix was cached
    plain = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason is not None


def test_async_client_runs_requests_concurrently(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
        async def one(i):
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=12,
                stream=True, seed=i)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        texts = await asyncio.gather(*(one(i) for i in range(6)))
        await aclient.close()
        return texts
    assert all(asyncio.run(main()))


def test_sampling_options_seed_n_stop_and_penalties(client):
    args = dict(model=MODEL, messages=HI, max_tokens=16, temperature=1.0, top_p=0.9, seed=7, n=2,
                presence_penalty=0.5, frequency_penalty=0.5)
    first, again = client.chat.completions.create(**args), client.chat.completions.create(**args)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]
    greedy = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=24, temperature=0)
    word = greedy.choices[0].message.content.split()[2]
    stopped = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0, stop=[word])
    assert word not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    assert client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=3).usage.completion_tokens == 3


def test_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)  # greedy picks the top token


def test_tool_choice_required_named_none_and_streamed_deltas(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], tool_choice=choice,
                                             max_tokens=40, temperature=0)
        call = out.choices[0].message.tool_calls[0]
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str) and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=40, temperature=0, stream=True))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], tool_choice="none",
                                          max_tokens=12, temperature=0)
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    auto = client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], max_tokens=40, temperature=0)
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
    one = client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=60, temperature=0)
    assert len(one.choices[0].message.tool_calls) == 1  # a forced reply then holds exactly one call


def test_response_formats_and_parse_with_a_pydantic_model(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    parsed = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Paris is the capital of France. Extract the city."}],
        response_format=City, max_tokens=60, temperature=0)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_completions_endpoint(client):
    out = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky is"], max_tokens=5,
                                    temperature=0, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 10
    assert "".join(out.choices[0].logprobs.tokens) == out.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}


# ---- errors ----------------------------------------------------------------------------------------------------
def _post(server, body, key=KEY, path="/v1/chat/completions", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if "content" not in kw:
        kw["json"] = body
    return httpx.post(server.base_url + path, headers=headers, timeout=60, **kw)


def _assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in response.text and set(error) >= {"type", "param", "code"}
    return error


def test_error_statuses(server, client):
    _assert_openai_error(_post(server, {"model": MODEL, "messages": HI}, key=None), 401)
    _assert_openai_error(_post(server, {"model": MODEL, "messages": HI}, key="sk-wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    error = _assert_openai_error(_post(server, {"model": "gpt-4o", "messages": HI}), 404)
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    error = _assert_openai_error(_post(server, {"model": MODEL, "messages": HI, "temperature": 5}), 400)
    assert error["param"] == "temperature"
    _assert_openai_error(_post(server, None, content=b"{not json"), 400)
    _assert_openai_error(_post(server, {"model": MODEL, "messages": []}), 400)
    _assert_openai_error(_post(server, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _assert_openai_error(_post(server, {"model": MODEL, "messages": HI, "tool_choice": "required"}), 400)
    bad_tool = {"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}
    _assert_openai_error(_post(server, {"model": MODEL, "messages": HI, "tools": [bad_tool]}), 400)
    too_long = {"model": MODEL, "prompt": "word " * 60000, "max_tokens": 1}
    _assert_openai_error(_post(server, too_long, path="/v1/completions"), 413)  # over the 256 KiB limit
    chunked = iter([b'{"model": "x", "prompt": "', b"a" * 200_000, b"a" * 200_000, b'"}'])
    _assert_openai_error(_post(server, None, content=chunked), 413)  # no Content-Length: counted as it arrives
    _assert_openai_error(_post(server, {"model": MODEL, "prompt": "hi " * 9000}, path="/v1/completions"), 400)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, top_p=0)
    assert httpx.get(server.base_url + "/v1/nowhere").status_code == 404


BAD_PROMPTS = {  # completions: a prompt the engine refuses (the facade checks it when the stream is first read)
    "too long for the context": ("hi " * 9000, "context_length_exceeded"),
    "empty": ("", None),
    "a token id past the vocabulary": ([10**9], None),
    "one bad prompt in a list": (["Once upon a time", "hi " * 9000], "context_length_exceeded"),
    "of the wrong type": ({"text": "hi"}, None),
}
BAD_CONVERSATIONS = {  # chat: a conversation the core refuses
    "too long for the context": ([{"role": "user", "content": "hi " * 9000}], "context_length_exceeded"),
    "content of the wrong type": ([{"role": "user", "content": 5}], None),
    "a message without a role": ([{"content": "Hi"}], None),
    "a message that is not an object": (["Hi"], None),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_bad_prompts_get_a_400_before_any_stream_starts(server, client, stream):
    """A bad prompt is a 400 in OpenAI's shape, streamed or not: never a 200 whose stream then breaks, never a
    500; the good prompt of a list is aborted (no leaked blocks) and the server goes on serving."""
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    cases = [("/v1/completions", {"prompt": p}, code) for p, code in BAD_PROMPTS.values()]
    cases += [("/v1/chat/completions", {"messages": m}, code) for m, code in BAD_CONVERSATIONS.values()]
    cases += [("/v1/completions", {"prompt": "Hi", "max_tokens": 10**6}, "context_length_exceeded"),
              ("/v1/chat/completions", {"messages": HI, "max_tokens": 10**6}, "context_length_exceeded")]
    for path, body, code in cases:
        response = _post(server, {"model": MODEL, "max_tokens": 8, **body, **extra}, path=path)
        error = _assert_openai_error(response, 400)
        assert response.headers["content-type"].startswith("application/json"), (body, response.headers)
        assert error["type"] == "invalid_request_error" and (code is None or error["code"] == code), error
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):  # the SDK raises at the call, too
        client.completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=4, stream=stream)
    with pytest.raises(openai.BadRequestError, match="content of type int"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}], stream=stream)
    wait_idle(server)
    good = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=stream)
    text = "".join(c.choices[0].text for c in good if c.choices) if stream else good.choices[0].text
    assert text


def test_503_while_the_engine_restarts(server, client):
    restart = asyncio.run_coroutine_threadsafe(server.engine.restart(), server.server_loop())
    deadline = time.monotonic() + 10
    while server.engine.state != "restarting":
        assert time.monotonic() < deadline and not restart.done()
        time.sleep(0.01)
    health = httpx.get(server.base_url + "/health")
    _assert_openai_error(health, 503)
    busy = _post(server, {"model": MODEL, "messages": HI, "max_tokens": 2})
    _assert_openai_error(busy, 503)
    assert busy.headers["retry-after"]
    restart.result(300)
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content


# ---- disconnects, load and metrics -----------------------------------------------------------------------------
def test_200_streams_with_hangups_lose_nothing_and_leak_no_blocks(server):
    async def one(http, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Number {i}?"}],
                "max_tokens": 8, "temperature": 0.7, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if i % 10 == 0:
                        return None  # hang up after the first event: the server must abort the request
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        usage = chunks[-1]["usage"]
        assert text and usage["completion_tokens"] >= 1
        return usage["completion_tokens"]

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                                     limits=limits, timeout=600) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    results = asyncio.run(main())
    assert sum(r is None for r in results) == 20
    assert all(r is not None and r >= 1 for i, r in enumerate(results) if i % 10)
    wait_idle(server)


def test_non_streaming_client_that_times_out_aborts_its_request(server):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=1.5)
    wait_idle(server, timeout=10)  # 2000 tokens would take far longer than this on the CPU


def test_metrics_exposition(server, client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=False)
    text = httpx.get(server.base_url + "/metrics").text
    assert 'optimum_nvidia_requests_total{endpoint="chat",status="200"}' in text
    assert 'optimum_nvidia_requests_total{endpoint="chat",status="499"}' in text  # the hang-ups above
    for status in (400, 401, 404):  # refused before they reached the engine: counted too
        assert f'optimum_nvidia_requests_total{{endpoint="chat",status="{status}"}}' in text, status
    for name in ("optimum_nvidia_time_to_first_token_seconds_count", "optimum_nvidia_inter_token_latency_seconds_count",
                 "optimum_nvidia_generation_tokens_total", "optimum_nvidia_prompt_tokens_total",
                 "optimum_nvidia_requests_running", "optimum_nvidia_requests_waiting",
                 "optimum_nvidia_kv_cache_usage_ratio"):
        assert name in text, name
    ttft = next(line for line in text.splitlines() if line.startswith("optimum_nvidia_time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) > 0
