"""Scale-out on Ray Serve: one engine replica per GPU behind the same OpenAI-compatible app, with session affinity.

    EngineReplica (num_replicas = GPUs, one GPU each)  <-  SessionAffinityRouter  <-  OpenAIIngress (app.py's app)

The ingress is ``create_app`` itself (no second HTTP layer): its engine object, ``ReplicaPool``, sends each
request to the replicas through a Serve handle. The router ranks replicas by rendezvous hashing of the request's
session key (the OpenAI ``user`` field, else the conversation's first two messages or the prompt's start), so
every turn of one agent reaches the replica whose prefix cache holds its history; when that replica is full it
falls back to the others. For /metrics the pool asks every replica for its engine's ``stats()`` in turn: a
``stats`` call names the replicas already asked (``skip``) and the router sends it to one not among them.
Ray Serve's own LLM ingress (``ray.serve.llm``) needs vLLM or SGLang for its request types, which is why our app
is the ingress here.

    serve run optimum_nvidia_core.server.ray_serve:app_builder model=MODEL replicas=2
    python -m optimum_nvidia_core.server.ray_serve MODEL --replicas 2     # the same, plus ray.init()
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import time
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..outputs import Usage
from .app import create_app
from .metrics import RequestTimer
from .serving import OpenAIServing

MAX_ONGOING_REQUESTS = 512  # per replica; the engine's own scheduler queues what its batch cannot take
STATS_TIMEOUT_S = 5.0  # per replica asked for /metrics: a scrape never hangs on a replica that is full or stuck


class SessionAffinityRouter(RequestRouter):
    """Rendezvous hashing on ``affinity``: the same key always ranks the same replica first. A call that names
    replicas to ``skip`` goes to another one (any, once all were asked)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if "skip" in kwargs:
            unasked = [r for r in candidate_replicas if r.replica_id.unique_id not in kwargs["skip"]]
            return [unasked[:1] or candidate_replicas[:1]]
        key = kwargs.get("affinity")
        if not key or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rank_replicas(key, list(by_id))]
        return [ranked[:1], ranked[1:]]  # the key's replica first; the others only when it is full


def rank_replicas(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest-random-weight) order: adding or removing a replica moves only the keys it wins or
    held, so the other sessions keep their prefix caches."""
    score = lambda replica: hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest()  # noqa: E731
    return sorted(replica_ids, key=score, reverse=True)


def affinity_key(req: Any) -> str:
    return "user:" + req.user if req.user else "prefix:" + req.affinity_text()


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
class EngineReplica:
    """One engine (one GPU) inside a Ray actor; streams OpenAI chunks for the ingress."""

    def __init__(self, model: str, served_model_name: str, engine_options: dict[str, Any]):
        from ..llm import LLM

        threads = engine_options.pop("torch_threads", None)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.llm = LLM(model, **engine_options)
        self.serving = OpenAIServing(self.llm, served_model_name)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def chat(self, req: Any, affinity: str | None = None) -> AsyncIterator[dict]:
        async for item in self.serving.chat(req):
            yield {**item, "system_fingerprint": self.replica}

    async def completions(self, req: Any, affinity: str | None = None) -> AsyncIterator[dict]:
        async for item in self.serving.completions(req):
            yield {**item, "system_fingerprint": self.replica}

    def stats(self, skip: list[str] | None = None) -> tuple[str, dict[str, int]]:
        """(this replica's id, its engine's stats()); ``skip`` is for the router."""
        return self.replica, self.llm.stats()

    def check_health(self) -> None:
        self.llm.stats()  # raises if the engine is gone: Serve then replaces this replica


class ReplicaPool:
    """The engine object ``create_app`` serves, backed by the replicas behind a Serve handle."""

    state = "ready"

    def __init__(self, handle: Any, model_names: list[str]):
        self.unary = handle
        self.handle = handle.options(stream=True)
        self.model_names = model_names

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def check_ready(self) -> None:
        pass  # Serve routes only to healthy replicas and queues while none is

    async def replica_stats(self) -> dict[str, dict[str, int]]:
        """Each live replica's engine stats, asked one replica at a time until one answers twice."""
        found: dict[str, dict[str, int]] = {}
        while True:
            response = self.unary.stats.remote(skip=list(found))
            try:
                replica, stats = await asyncio.wait_for(asyncio.ensure_future(response), STATS_TIMEOUT_S)
            except asyncio.TimeoutError:
                response.cancel()
                return found
            if replica in found:
                return found
            found[replica] = stats

    def chat(self, req: Any, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        return self._relay(self.handle.chat.remote(req, affinity=affinity_key(req)), timer)

    def completions(self, req: Any, timer: RequestTimer | None = None) -> AsyncIterator[dict]:
        return self._relay(self.handle.completions.remote(req, affinity=affinity_key(req)), timer)

    @staticmethod
    async def _relay(items: Any, timer: RequestTimer | None) -> AsyncIterator[dict]:
        finished = False
        try:
            async for item in items:
                if timer is not None and item.get("choices"):
                    timer.tokens(1)  # chunks, not tokens: the replica knows the exact counts (see usage)
                if timer is not None and "usage" in item:
                    u = item["usage"]
                    timer.finish(Usage(u["prompt_tokens"], u["completion_tokens"],
                                       u["prompt_tokens_details"]["cached_tokens"]))
                yield item
            finished = True
        finally:
            if not finished:
                items.cancel()  # a client that hung up frees its replica's KV blocks too


@serve.deployment(max_ongoing_requests=4 * MAX_ONGOING_REQUESTS)
@serve.ingress()
class OpenAIIngress:
    def __init__(self, replicas: Any, model_names: list[str], api_key: str | None = None):
        self.pool = ReplicaPool(replicas, model_names)
        self.api_key = api_key

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.pool, api_key=self.api_key)


def build_app(model: str, *, replicas: int = 1, gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0,
              served_model_name: str | None = None, api_key: str | None = None, **engine_options: Any) -> Any:
    """The Serve application: ``replicas`` engines (each with ``gpus_per_replica`` GPUs) behind one ingress."""
    name = served_model_name or model
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    router = RequestRouterConfig(request_router_class=SessionAffinityRouter)
    engines = EngineReplica.options(num_replicas=replicas, ray_actor_options=actor,
                                    request_router_config=router).bind(model, name, engine_options)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(engines, [name], api_key)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run optimum_nvidia_core.server.ray_serve:app_builder model=... replicas=...``."""
    args = dict(args)
    model = args.pop("model")
    numbers = {"replicas": int, "gpus_per_replica": float, "cpus_per_replica": float, "max_batch_size": int,
               "max_num_tokens": int, "max_seq_len": int, "torch_threads": int}
    options = {k: numbers.get(k, str)(v) for k, v in args.items()}
    options.setdefault("api_key", os.environ.get("OPTIMUM_NVIDIA_API_KEY"))
    return build_app(model, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve MODEL on Ray Serve: N engine replicas, one ingress")
    parser.add_argument("model")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--gpus-per-replica", type=float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args.model, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                        device=args.device, api_key=os.environ.get("OPTIMUM_NVIDIA_API_KEY")), route_prefix="/")
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1 with {args.replicas} replicas", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
