"""Prometheus metrics of one server: requests, tokens, latency histograms, in-flight sequences and KV-cache use.

Each app owns a ``CollectorRegistry`` (two servers in one process do not share counters). Engine figures
(KV blocks, prefix-cache hits) are read from each engine's ``stats()`` at scrape time, so nothing polls the
engines; every one is labelled with its ``replica`` (``local`` for the engine in the server's own process, the
Serve replica id under Ray).
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "optimum_nvidia"
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens", "Prompt tokens from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Gap between two streamed deltas",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS,
                             registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests generating tokens", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting for their first token", registry=r)

    def start(self) -> "RequestTimer":
        return RequestTimer(self)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def exposition(self, engine_stats: dict[str, dict[str, Any]]) -> bytes:
        """The server's metrics, then the engines' (``engine_stats``: replica -> its ``stats()``)."""
        engines = CollectorRegistry()
        engines.register(_EngineCollector(engine_stats))
        return generate_latest(self.registry) + generate_latest(engines)


class RequestTimer:
    """One request's timings: waiting until its first token, running until it ends (``finish`` is idempotent)."""

    __slots__ = ("metrics", "arrival", "last", "done")

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.done = False
        metrics.waiting.inc()

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
            self.metrics.waiting.dec()
            self.metrics.running.inc()
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def finish(self, usage: Any = None) -> None:
        if self.done:
            return
        self.done = True
        (self.metrics.waiting if self.last is None else self.metrics.running).dec()
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage.prompt_tokens)
            self.metrics.cached_tokens.inc(usage.cached_tokens)
            self.metrics.generation_tokens.inc(usage.completion_tokens)
            self.metrics.e2e.observe(time.perf_counter() - self.arrival)


class _EngineCollector:
    """KV-cache blocks and engine counters of each replica, from the ``stats()`` read for this scrape."""

    COUNTERS = ("running_requests", "waiting_requests", "prefix_cache_hit_tokens", "preemptions", "steps")

    def __init__(self, engine_stats: dict[str, dict[str, Any]]):
        self._stats = engine_stats

    def collect(self):
        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["replica"])

        usage = family("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
        free = family("kv_cache_free_blocks", "Free KV-cache blocks")
        total = family("kv_cache_total_blocks", "All KV-cache blocks")
        engine = {key: family(f"engine_{key}", f"Engine stats()['{key}']") for key in self.COUNTERS}
        for replica, stats in sorted(self._stats.items()):
            if stats.get("total_blocks"):
                usage.add_metric([replica], 1 - stats["free_blocks"] / stats["total_blocks"])
                free.add_metric([replica], stats["free_blocks"])
                total.add_metric([replica], stats["total_blocks"])
            for key, gauge in engine.items():
                if key in stats:
                    gauge.add_metric([replica], stats[key])
        for gauge in (usage, free, total, *engine.values()):
            if gauge.samples:
                yield gauge
