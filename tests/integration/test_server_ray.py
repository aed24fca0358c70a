"""Ray Serve scale-out on the CPU: a local Ray instance, two SmolLM2 replicas behind the OpenAI ingress, session
affinity observed (each agent's turns land on one replica and hit its prefix cache), both replicas used, and the
ingress's /metrics carries each replica's KV-cache gauges; a client that hangs up frees its replica's KV blocks."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from live_server import free_port
from optimum_nvidia_core.hub import DEFAULT_MODEL

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SYSTEM = ("You are agent number {i}. You help with questions about gardening, cooking and travel. Keep answers "
          "short, friendly and practical; mention one concrete tip in every answer, and never use lists.")


@pytest.fixture(scope="module")
def ingress():
    from ray import serve

    from optimum_nvidia_core.server.ray_serve import build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(DEFAULT_MODEL, replicas=2, gpus_per_replica=0, cpus_per_replica=1, device="cpu",
                            torch_threads=1, max_batch_size=16), route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_keep_each_agent_on_the_replica_that_caches_its_prefix(ingress):
    client = openai.OpenAI(base_url=ingress, api_key="unused", max_retries=0)
    replicas_of_agent = {}
    for i in range(12):
        messages = [{"role": "system", "content": SYSTEM.format(i=i)}, {"role": "user", "content": "Hi!"}]
        seen = []
        for turn in range(2):
            out = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=6, temperature=0)
            seen.append(out.system_fingerprint)
            if turn:  # the replica already holds this agent's system prompt and first turn
                assert out.usage.prompt_tokens_details.cached_tokens >= 32, (i, out.usage)
            messages += [{"role": "assistant", "content": out.choices[0].message.content},
                         {"role": "user", "content": "Tell me more."}]
        assert len(set(seen)) == 1, seen
        replicas_of_agent[i] = seen[0]
    assert len(set(replicas_of_agent.values())) == 2  # 12 agents hashed over 2 replicas: both serve
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "wizard", "content": "Hi"}])
    metrics = httpx.get(ingress.removesuffix("/v1") + "/metrics", timeout=60).text
    for replica in set(replicas_of_agent.values()):  # every replica's engine, labelled with its id
        total = _gauge(metrics, "optimum_nvidia_kv_cache_total_blocks", replica)
        assert total > 0 and _gauge(metrics, "optimum_nvidia_kv_cache_free_blocks", replica) == total  # idle
        assert _gauge(metrics, "optimum_nvidia_kv_cache_usage_ratio", replica) == 0.0
    assert 'optimum_nvidia_requests_total{endpoint="chat",status="200"}' in metrics


def test_a_client_that_hangs_up_frees_its_replicas_kv_blocks(ingress):
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ingress + "/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        replica = next(json.loads(e[6:])["system_fingerprint"] for e in events if e.startswith("data: "))
        streaming = httpx.get(ingress.removesuffix("/v1") + "/metrics", timeout=60).text
        free_streaming = _gauge(streaming, "optimum_nvidia_kv_cache_free_blocks", replica)
        assert free_streaming < _gauge(streaming, "optimum_nvidia_kv_cache_total_blocks", replica)  # holds some
    # hung up after the first token: 4000 tokens would take many minutes on this CPU; the abort frees them at once
    deadline = time.monotonic() + 60
    while True:
        metrics = httpx.get(ingress.removesuffix("/v1") + "/metrics", timeout=60).text
        free = _gauge(metrics, "optimum_nvidia_kv_cache_free_blocks", replica)
        if free == _gauge(metrics, "optimum_nvidia_kv_cache_total_blocks", replica):
            break
        assert time.monotonic() < deadline, f"replica {replica} kept its blocks: {free} free ({free_streaming} then)"
        time.sleep(0.5)
    assert _gauge(metrics, "optimum_nvidia_engine_running_requests", replica) == 0


def _gauge(metrics: str, name: str, replica: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(f'{name}{{replica="{replica}"}}'))
    return float(line.split()[-1])
