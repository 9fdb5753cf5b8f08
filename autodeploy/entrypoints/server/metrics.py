"""Prometheus metrics of one server: request and token counters, TTFT/TPOT/latency histograms, and the engine's
live state (running and waiting requests, KV-cache pages) read from ``EngineService.stats()`` at scrape time.

Every app gets its own ``CollectorRegistry`` so several servers can live in one process (tests start many);
nothing is registered in prometheus-client's global registry.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "autodeploy"
# Latency buckets (seconds): CPU serving sits in the upper half, GPU decode in the lower.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# stats() key -> (metric name without the prefix, help)
ENGINE_GAUGES = {
    "num_running": ("num_requests_running", "Requests in the engine's running batch."),
    "num_waiting": ("num_requests_waiting", "Requests waiting for admission."),
    "kv_pages_used": ("kv_cache_pages_used", "KV-cache pages in use."),
    "kv_pages_total": ("kv_cache_pages_total", "KV-cache pages in the pool."),
}
ENGINE_COUNTERS = {
    "num_preemptions": ("engine_preemptions", "Requests preempted (KV pages ran out) since start."),
    "requests_finished": ("engine_requests_finished", "Requests the engine finished since start."),
    "prompt_tokens": ("engine_prompt_tokens", "Prompt tokens the engine admitted since start."),
    "generation_tokens": ("engine_generation_tokens", "Tokens the engine generated since start."),
}


class _EngineStatsCollector(Collector):
    """Reads the engine's counters when scraped, so the figures are never stale."""

    def __init__(self, stats_fn: Callable[[], dict]):
        self.stats_fn = stats_fn

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats_fn()
        except Exception:  # a failing engine must not take /metrics down with it
            log.exception("engine stats unavailable")
            return
        for key, (name, doc) in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(stats[key]))
        used, total = stats.get("kv_pages_used"), stats.get("kv_pages_total")
        if used is not None and total:
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Fraction of KV-cache pages in use.",
                                    value=float(used) / float(total))
        for key, (name, doc) in ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(stats[key]))


class ServerMetrics:
    """The metrics of one app; ``render()`` is what ``GET /metrics`` returns."""

    def __init__(self, stats_fn: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=r)
        self.requests_finished = Counter(f"{PREFIX}_requests_finished",
                                         "Generation requests (one per prompt) by finish reason.",
                                         ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated for served requests.",
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from request arrival to its first token.", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineStatsCollector(stats_fn))

    def observe_request(self, *, finish_reason: str, prompt_tokens: int, generation_tokens: int,
                        ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        self.requests_finished.labels(finish_reason=finish_reason or "unknown").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
