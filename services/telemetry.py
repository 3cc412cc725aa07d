"""OpenTelemetry tracing, shared by every service: setup, gRPC instrumentation, W3C context helpers.

Off unless an OTLP endpoint is given (`--otlp-traces-endpoint`, as vLLM names it, or the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, which `pagemesh serve` sets for
every child). When off, the global tracer provider stays OpenTelemetry's no-op one, no interceptor
is installed, and the helpers below cost next to nothing, so the hot paths call them unconditionally.
The other OTEL_* variables (OTEL_BSP_SCHEDULE_DELAY, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
OTEL_EXPORTER_OTLP_TRACES_INSECURE/HEADERS/TIMEOUT, OTEL_TRACES_SAMPLER, ...) are read by the SDK.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# The step stream (scheduler -> worker) and the detokenize stream live as long as the connection:
# a span for either would last hours and belong to no request (steps get spans of their own, in
# worker/observability.py). Health checks, readiness probes and metric scrapes come every few
# seconds from machines, and would bury the requests' traces.
_UNTRACED_METHODS = ("Step", "DetokenizeStream", "Ready", "GetMetrics")
_W3C = TraceContextTextMapPropagator()
_enabled = False


def setup_tracing(service_name: str, endpoint: str | None = None) -> bool:
    """Install a tracer provider exporting OTLP over gRPC; True when tracing is on.

    service_name names this process in traces (OTEL_SERVICE_NAME wins when set: under `pagemesh
    serve` every child shares one environment, so leave it unset there)."""
    global _enabled
    endpoint = (
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    # shutdown_on_exit: the provider flushes its batch at interpreter exit, which every service
    # reaches on SIGTERM (their signal handlers return from main).
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=True)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_otlp_url(endpoint))))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def _otlp_url(endpoint: str) -> str:
    """`host:port` and `grpc://host:port` mean a plaintext collector (the usual local sidecar);
    the exporter would otherwise read a bare `localhost:4317` as scheme `localhost` and try TLS.
    `https://` keeps TLS; OTEL_EXPORTER_OTLP_TRACES_INSECURE still overrides either."""
    if "://" not in endpoint:
        return f"http://{endpoint}"
    if endpoint.startswith("grpc://"):
        return "http://" + endpoint.removeprefix("grpc://")
    return endpoint


def tracing_enabled() -> bool:
    return _enabled


def shutdown_tracing() -> None:
    """Flush what is batched (the atexit hook does it too; this is for exits that skip atexit)."""
    provider = trace.get_tracer_provider()
    if _enabled and hasattr(provider, "shutdown"):
        provider.shutdown()


def get_tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


# -- W3C trace context as a string, for places without gRPC metadata (the worker's step messages) --


def current_traceparent() -> str:
    """The current span's W3C traceparent, or "" when nothing is being traced."""
    if not _enabled:
        return ""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def span_context_of(traceparent: str) -> trace.SpanContext | None:
    if not traceparent:
        return None
    ctx = trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()
    return ctx if ctx.is_valid else None


def context_with_parent(span_context: trace.SpanContext) -> otel_context.Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


# -- gRPC instrumentation (opentelemetry-instrumentation-grpc), only while tracing is on -------------


def _traced(details: Any) -> bool:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    service, _, name = method.lstrip("/").rpartition("/")
    return name not in _UNTRACED_METHODS and service != "grpc.health.v1.Health"


def server_interceptors(aio: bool) -> list[Any]:
    """Server spans continuing the caller's traceparent from the call's metadata."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation import grpc as otel_grpc

    if aio:
        return [otel_grpc.aio_server_interceptor(filter_=_traced)]
    return [otel_grpc.server_interceptor(filter_=_traced)]


def aio_client_interceptors() -> list[Any]:
    """Client spans that put the current context into each call's metadata (traceparent)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation import grpc as otel_grpc

    return list(otel_grpc.aio_client_interceptors(filter_=_traced))


def metadata_value(metadata: Sequence[Any] | None, key: str) -> str:
    """One value out of a call's invocation metadata ("" when absent)."""
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return ""
