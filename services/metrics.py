"""Prometheus metrics: one registry per process, optionally served on its own port, and the
engine's set under vLLM's names (vllm:*, labelled model_name) so dashboards built for vLLM work.

The scheduler owns the engine state, so it owns the vllm:* metrics; the gateway's /metrics shows
them through the Inference API's GetMetrics. State that is already counted somewhere (queue
lengths, KV usage, preemptions, prefix-cache counters) is read at scrape time rather than copied
on every step; what happens to requests (tokens, latencies, finishes) is counted as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.scheduler.engine_loop import EngineLoop

# The *_created series would double every counter, and vLLM's dashboards do not read them.
disable_created_metrics()

# The classic text format (0.0.4): every Prometheus version and scraper reads it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# vLLM's bucket boundaries, so histogram_quantile over its dashboards gives the same resolution.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def new_registry() -> CollectorRegistry:
    """A registry for this process: its own metrics plus process_* (CPU, memory, open files)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def serve_metrics(registry: CollectorRegistry, port: int | None, host: str = "127.0.0.1") -> None:
    """Serve /metrics on host:port from a daemon thread; nothing when port is None."""
    if port is not None:
        start_http_server(port, addr=host, registry=registry)


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


class EngineMetrics:
    """vLLM's request-level metrics for one served model, updated by the scheduler's servicer."""

    def __init__(self, model_name: str) -> None:
        # Its own registry, without process_* metrics: GetMetrics serves it to the gateway, whose
        # /metrics adds the gateway's own process metrics, and the same names twice would clash.
        self.model_name = model_name
        self.registry = registry = CollectorRegistry()
        m = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m, registry=registry
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Count of finished requests, by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=registry,
        )

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=registry).labels(model_name)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in the waiting queue in seconds.",
            REQUEST_BUCKETS,
        )

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def watch(self, engine_loop: EngineLoop) -> None:
        """Add the gauges and counters read from the engine's own state at every scrape."""
        self.registry.register(_EngineState(self.model_name, engine_loop))


class _EngineState(Collector):
    """Reads the engine thread's state without a lock: lengths and integer counters are read
    atomically under the GIL, and a scrape that is one step stale is fine."""

    def __init__(self, model_name: str, engine_loop: EngineLoop) -> None:
        self.labels = [model_name]
        self.engine_loop = engine_loop

    def collect(self) -> Iterator[Metric]:
        loop = self.engine_loop
        s = loop.engine.scheduler
        bm = s.block_manager

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(self.labels, value)
            return c

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", len(s.running)
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(s.waiting)
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", bm.usage)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", s.num_preemptions)
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in number of queried tokens.", bm.query_tokens
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in number of cached tokens.", bm.hit_tokens
        )
        yield counter("pagemesh:engine_steps", "Engine steps run by the worker.", loop.num_steps)
        yield counter(
            "pagemesh:device_seconds", "Seconds the worker spent computing steps.", loop.engine.device_seconds
        )
        yield counter("pagemesh:worker_losses", "Times the worker was lost.", loop.num_worker_losses)
