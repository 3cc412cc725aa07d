"""The worker's side of tracing and metrics: one span per engine step, and step metrics.

A step serves many requests, so its span cannot be a child of all of them. It is a child of the
first traced request it computed for (so a lone request's trace holds every step it took part
in) and links to every traced request in it, each link carrying how many of the step's tokens
were that request's. The scheduler sends each request's W3C traceparent once, when the worker
first sees the request; the worker keeps it until the request is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from protos.pagemesh.v1 import worker_pb2
from services.telemetry import context_with_parent, get_tracer, span_context_of, tracing_enabled

STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class StepObserver:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.tracer = get_tracer("pagemesh.worker")
        self.contexts: dict[str, trace.SpanContext] = {}  # req_id -> its request's span
        self.step_seconds = Histogram(
            "pagemesh:worker_step_seconds", "Compute time of one engine step.", buckets=STEP_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.step_tokens = Counter(
            "pagemesh:worker_step_tokens", "Tokens computed (prefill and decode).", registry=registry
        )

    def reset(self) -> None:
        """A new step stream starts with an empty batch."""
        self.contexts.clear()

    @contextmanager
    def step(self, message: worker_pb2.StepInput) -> Iterator[trace.Span | None]:
        """Wraps one step's execution; yields its span (None when not traced)."""
        self.step_tokens.inc(sum(message.num_scheduled_tokens))
        if not tracing_enabled():
            yield None
            return
        for req_id in message.dropped_req_ids:  # drops first: a preempted request may come back new
            self.contexts.pop(req_id, None)
        for new in message.new_requests:
            if (ctx := span_context_of(new.traceparent)) is not None:
                self.contexts[new.req_id] = ctx
        links = []
        for req_id, n in zip(message.scheduled_req_ids, message.num_scheduled_tokens, strict=True):
            if (ctx := self.contexts.get(req_id)) is not None:
                links.append(trace.Link(ctx, {"pagemesh.request_id": req_id, "pagemesh.scheduled_tokens": n}))
        if not links:  # only drops, or requests nobody traces: a span would be a trace of its own
            yield None
            return
        attributes = {
            "pagemesh.step_id": message.step_id,
            "pagemesh.num_requests": len(message.scheduled_req_ids),
            "pagemesh.num_new_requests": len(message.new_requests),
            "pagemesh.num_scheduled_tokens": sum(message.num_scheduled_tokens),
        }
        parent = context_with_parent(links[0].context)
        with self.tracer.start_as_current_span(
            "worker step", context=parent, links=links, attributes=attributes
        ) as span:
            yield span

    def finished(self, span: trace.Span | None, compute_seconds: float) -> None:
        self.step_seconds.observe(compute_seconds)
        if span is not None:
            span.set_attribute("pagemesh.compute_seconds", compute_seconds)
