"""The gateway's observability: the HTTP server span that starts (or continues) each request's
trace, HTTP metrics, the feature tag forwarded to the scheduler, /ready and /metrics.

The span is opened in a pure ASGI middleware, outermost, so it covers everything the request
goes through (auth refusals, streamed bodies to their last byte) and is current while the routes
make their gRPC calls: the client interceptors of services.telemetry then carry it to the
scheduler as traceparent metadata. A W3C traceparent from the client becomes its parent.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protos.pagemesh.v1 import inference_pb2
from services.metrics import CONTENT_TYPE, REQUEST_BUCKETS, new_registry, render
from services.telemetry import get_tracer, tracing_enabled

FEATURE_HEADER = "x-pagemesh-feature"  # the caller's cost-attribution tag, forwarded as gRPC metadata
READY_TIMEOUT_S = 2.0  # the scheduler's own check takes at most about 1 s (its worker probe)
_feature: contextvars.ContextVar[str] = contextvars.ContextVar("pagemesh_feature", default="")


class HttpObservability:
    """Per HTTP request: a SERVER span (when tracing is on) and the pagemesh:http_* metrics."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = get_tracer("pagemesh.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        status = 500  # what the client sees if the app raises before it answers
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _feature.set(headers.get(FEATURE_HEADER, ""))
        try:
            if tracing_enabled():
                await self._traced(scope, receive, send_status, headers, lambda: status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            _feature.reset(token)
            self.metrics.observe(method, _route(scope), status, time.perf_counter() - start)

    async def _traced(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, status: Callable[[], int]
    ) -> None:
        current = trace.get_current_span()
        if current.is_recording():
            # FastAPI's native telemetry (recent versions) already opened the HTTP server span,
            # continuing the client's traceparent: add to it rather than open a sibling.
            await self._run(current, scope, receive, send, status)
            return
        parent = propagate.extract(dict(headers))  # the client's traceparent, if any, is continued
        with self.tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}", context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            await self._run(span, scope, receive, send, status)

    async def _run(
        self, span: trace.Span, scope: Scope, receive: Receive, send: Send, status: Callable[[], int]
    ) -> None:
        span.set_attributes(_attributes(scope, Headers(scope=scope)))
        try:
            await self.app(scope, receive, send)
        finally:  # before the span ends: attributes set later would be dropped
            route = _route(scope)
            span.update_name(f"{scope['method']} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status())
            if request_id := scope.get("state", {}).get("request_id"):
                span.set_attribute("pagemesh.request_id", request_id)
            if status() >= 500:
                span.set_status(trace.StatusCode.ERROR)


def _attributes(scope: Scope, headers: Headers) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "user_agent.original": headers.get("user-agent", ""),
    }
    if feature := headers.get(FEATURE_HEADER):
        attributes["pagemesh.feature"] = feature
    if server := scope.get("server"):
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    return attributes


def _route(scope: Scope) -> str:
    """The matched route's template (low cardinality for metrics and span names)."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = new_registry()  # the gateway's process metrics too
        self.requests = Counter(
            "pagemesh:http_requests", "HTTP requests answered.", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "pagemesh:http_request_duration_seconds", "Time to answer an HTTP request, streams included.",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


# -- the feature tag on every gRPC call made for the request ------------------------------------------


def _with_feature(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    feature = _feature.get()
    if not feature:
        return details
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), (FEATURE_HEADER, feature))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _FeatureUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_feature(details), request)


class _FeatureUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_feature(details), request)


def client_interceptors() -> list[Any]:
    """For the gateway's channel: the feature tag feeds span attributes only, so without tracing
    nothing is added and calls go through gRPC's plain, uninterceptable-call path."""
    return [_FeatureUnaryUnary(), _FeatureUnaryStream()] if tracing_enabled() else []


# -- routes ------------------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Add the middleware (call last among add_middleware: the last added runs first), /ready and
    /metrics. Routes find the scheduler stub at app.state.gateway.stub."""
    metrics = HttpMetrics()
    app.add_middleware(HttpObservability, metrics=metrics)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness with its reason: 200 when the scheduler says a token can come out soon, 503
        otherwise (loading, worker stalled or lost, draining, scheduler unreachable)."""
        gw = request.app.state.gateway
        try:
            r = await gw.stub.Ready(inference_pb2.ReadyRequest(), timeout=READY_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            reason = (
                f"the scheduler at {gw.scheduler_address} does not answer: {e.code().name}: {e.details()}"
            )
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        body = {
            "status": "ready" if r.ready else "unavailable",
            "reason": r.reason,
            "num_running": r.num_running,
            "num_waiting": r.num_waiting,
        }
        return JSONResponse(body, status_code=200 if r.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """The engine's vllm:* metrics (from the scheduler) and the gateway's own."""
        gw = request.app.state.gateway
        try:
            engine = (
                await gw.stub.GetMetrics(inference_pb2.GetMetricsRequest(), timeout=READY_TIMEOUT_S)
            ).text
        except grpc.aio.AioRpcError as e:
            # Still serve what the gateway knows; the missing vllm:* series tell the rest.
            engine = f"# the scheduler's metrics are missing: {e.code().name}\n"
        return Response(engine + render(metrics.registry), media_type=CONTENT_TYPE)
