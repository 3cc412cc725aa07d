"""What the scheduler tells about itself: per-request metrics and span attributes, readiness, and
the two RPCs that serve them (Ready, GetMetrics).

Per request, the Generate span (the gRPC server span opentelemetry-instrumentation-grpc opens,
continuing the caller's traceparent) gets the GenAI semantic-convention attributes, vLLM's latency
attributes, the prefix-cache hit, the feature tag the caller sent (x-pagemesh-feature metadata) and
the device-seconds the request used (its share of every step it was in, summed by the engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from protos.pagemesh.v1 import inference_pb2
from services.grpc_server import aio_channel
from services.metrics import CONTENT_TYPE, EngineMetrics, render
from services.telemetry import metadata_value

if TYPE_CHECKING:
    from services.sampling_params import SamplingParams
    from services.scheduler.engine_loop import EngineLoop, TokenRecord

log = logging.getLogger("pagemesh.scheduler")
FEATURE_HEADER = "x-pagemesh-feature"
FINISH_NAMES = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass(slots=True)
class _Tracked:
    span: trace.Span
    arrival: float
    num_prompt_tokens: int
    num_choices: int
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)  # choice index -> time of its last token
    finish: dict[int, str] = field(default_factory=dict)  # choice index -> finish reason
    device_seconds: dict[int, float] = field(default_factory=dict)
    queue_seconds: float | None = None


class RequestObserver:
    """Fed by the servicer at three points of a Generate call: started, every delivered message,
    ended. Runs on the event loop only, so it needs no lock."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self.requests: dict[str, _Tracked] = {}

    def started(
        self,
        request_id: str,
        request: inference_pb2.GenerateRequest,
        params: SamplingParams,
        num_prompt_tokens: int,
        arrival: float,
        context: grpc.aio.ServicerContext,
    ) -> None:
        span = trace.get_current_span()  # the Generate server span; a no-op span when not tracing
        self.requests[request_id] = _Tracked(span, arrival, num_prompt_tokens, params.n)
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat" if request.WhichOneof("input") == "chat" else "text_completion",
            "gen_ai.provider.name": "pagemesh",
            "gen_ai.request.model": request.model or self.metrics.model_name,
            "gen_ai.response.model": self.metrics.model_name,
            "gen_ai.request.id": request_id,  # vLLM's name
            "gen_ai.response.id": request_id,  # the semantic conventions' name
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.choice.count": params.n,
            "gen_ai.usage.input_tokens": num_prompt_tokens,
        }
        if params.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = params.max_tokens
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if feature := metadata_value(context.invocation_metadata(), FEATURE_HEADER):
            attributes["pagemesh.feature"] = feature
        span.set_attributes(attributes)

    def delivered(
        self, request_id: str, index: int, records: list[TokenRecord], msg: inference_pb2.GenerateResponse
    ) -> None:
        # Called inside the detokenization pipeline every request shares: a failed observation is
        # logged, never allowed to stop the pipeline.
        try:
            self._delivered(request_id, index, records, msg)
        except Exception:
            log.exception("metrics for request %s failed", request_id)

    def _delivered(
        self, request_id: str, index: int, records: list[TokenRecord], msg: inference_pb2.GenerateResponse
    ) -> None:
        t = self.requests.get(request_id)
        if t is None or not records:
            return
        now = time.monotonic()
        m = self.metrics
        last = t.last_token.get(index)
        if last is None:
            m.ttft.observe(now - t.arrival)
            m.prompt_tokens.inc(t.num_prompt_tokens)
            t.first_token = t.first_token or now
            t.queue_seconds = records[0].queue_seconds
        else:
            # Tokens sent together (--stream-interval, or a detokenizer behind) share the interval evenly.
            for _ in records:
                m.itl.observe((now - last) / len(records))
        t.last_token[index] = now
        t.device_seconds[index] = records[-1].device_seconds
        m.generation_tokens.inc(len(records))
        if msg.finish_reason:
            reason = FINISH_NAMES.get(msg.finish_reason, "abort")
            t.finish[index] = reason
            m.finished(reason)
            m.e2e.observe(now - t.arrival)
            m.queue_time.observe(records[-1].queue_seconds)

    def ended(self, request_id: str, usage: inference_pb2.Usage) -> None:
        """The call is over, however it ended: choices with no finish were aborted (the caller left,
        Abort, or a failure)."""
        t = self.requests.pop(request_id, None)
        if t is None:
            return
        for index in range(t.num_choices):
            if index not in t.finish:
                t.finish[index] = "abort"
                self.metrics.finished("abort")
        if not t.span.is_recording():
            return
        now = time.monotonic()
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.response.finish_reasons": [t.finish[i] for i in range(t.num_choices)],
            "gen_ai.latency.e2e": now - t.arrival,
            "pagemesh.prefix_cache_hit_tokens": usage.cached_tokens,
            "pagemesh.device_seconds": sum(t.device_seconds.values()),
        }
        if t.first_token is not None:
            attributes["gen_ai.latency.time_to_first_token"] = t.first_token - t.arrival
        if t.queue_seconds is not None:
            attributes["gen_ai.latency.time_in_queue"] = t.queue_seconds
        t.span.set_attributes(attributes)


class Readiness:
    """Ready means a token can come out soon: the worker finished a step within `stall_after`
    seconds, or, with no step running, it answers a health check now. A step running longer than
    `stall_after` means a wedged worker (stopped, deadlocked, its device hung): not ready, whatever
    its health service says, since that runs on other threads."""

    PROBE_TIMEOUT_S = 1.0
    PROBE_CACHE_S = 1.0  # a burst of probes (kubelet, Envoy, the gateway) shares one worker check

    def __init__(self, engine_loop: EngineLoop, stall_after: float = 5.0) -> None:
        self.engine_loop = engine_loop
        self.stall_after = stall_after
        self.draining = False  # set by the SIGUSR1 drain toggle
        self.tasks: list[tuple[str, asyncio.Task]] = []  # tasks the process cannot serve without
        self._stub: health_pb2_grpc.HealthStub | None = None
        self._lock: asyncio.Lock | None = None
        self._probe_at = float("-inf")
        self._probe: tuple[bool, str] = (False, "the worker was not probed yet")

    def watch_task(self, name: str, task: asyncio.Task) -> None:
        """A task that must run for the process's life: its end is logged and makes the process
        neither ready nor live (so an orchestrator restarts it instead of sending it requests)."""
        self.tasks.append((name, task))

        def ended(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s stopped", name, exc_info=t.exception())

        task.add_done_callback(ended)

    def dead(self) -> str | None:
        """Why the process can no longer serve at all, or None."""
        if not self.engine_loop.thread.is_alive():
            return "the engine thread is not running"
        for name, task in self.tasks:
            if task.done():
                error = None if task.cancelled() else task.exception()
                return f"{name} stopped" + (f": {error!r}" if error else "")
        return None

    async def check(self) -> tuple[bool, str]:
        loop = self.engine_loop
        if (reason := self.dead()) is not None:
            return False, reason
        if self.draining:
            return False, "draining (SIGUSR1): finishing the requests in flight, taking no new ones"
        if loop.worker_lost is not None:
            return False, f"lost the worker; waiting for it to come back ({loop.worker_lost})"
        now = time.monotonic()
        started = loop.step_started
        if started is not None and now - started > self.stall_after:
            return False, (
                f"worker step loop stalled: step {loop.engine.scheduler.step_id} has run for "
                f"{now - started:.1f}s with {len(loop.engine.scheduler.running)} requests running"
            )
        since = now - loop.last_step_time
        if loop.num_steps and since < self.stall_after:
            return True, f"the worker finished a step {since:.1f}s ago"
        return await self._probe_worker()

    async def _probe_worker(self) -> tuple[bool, str]:
        if self._lock is None:  # made on the event loop that uses them
            self._lock = asyncio.Lock()
            self._stub = health_pb2_grpc.HealthStub(aio_channel(self.engine_loop.worker_address))
        async with self._lock:
            if time.monotonic() - self._probe_at < self.PROBE_CACHE_S:
                return self._probe
            assert self._stub is not None
            try:
                reply = await self._stub.Check(health_pb2.HealthCheckRequest(), timeout=self.PROBE_TIMEOUT_S)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                self._probe = (
                    (True, "idle; the worker answers health checks")
                    if serving
                    else (False, "the worker reports NOT_SERVING")
                )
            except grpc.aio.AioRpcError as e:
                self._probe = (
                    False,
                    f"the worker did not answer a health check within {self.PROBE_TIMEOUT_S:.0f}s "
                    f"({e.code().name})",
                )
            self._probe_at = time.monotonic()
            return self._probe

    async def keep_health_truthful(self, health_servicer: Any, service: str, interval: float = 1.0) -> None:
        """Mirror readiness into grpc.health.v1 for `service` (what Kubernetes' readiness probe and
        Envoy's health checks ask), and liveness into the overall status: a dead engine thread or
        detokenization task means the process should be restarted."""
        SERVING, NOT_SERVING = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        last: tuple[int, int] | None = None
        while True:
            ready, _ = await self.check()
            now = (
                SERVING if ready else NOT_SERVING,
                SERVING if self.dead() is None else NOT_SERVING,
            )
            if now != last:
                await health_servicer.set(service, now[0])
                await health_servicer.set("", now[1])
                last = now
            await asyncio.sleep(interval)


class ObservabilityRPCs:
    """Ready and GetMetrics of pagemesh.v1.Inference, mixed into the servicer."""

    observer: RequestObserver  # set by the servicer's __init__
    readiness: Readiness | None = None  # set once the engine loop is connected

    async def Ready(
        self, request: inference_pb2.ReadyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ReadyResponse:
        if self.readiness is None:
            return inference_pb2.ReadyResponse(ready=False, reason="starting: not connected to a worker yet")
        ready, reason = await self.readiness.check()
        s = self.readiness.engine_loop.engine.scheduler
        return inference_pb2.ReadyResponse(
            ready=ready, reason=reason, num_running=len(s.running), num_waiting=len(s.waiting)
        )

    async def GetMetrics(
        self, request: inference_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.MetricsText:
        text = render(self.observer.metrics.registry)
        return inference_pb2.MetricsText(text=text, content_type=CONTENT_TYPE)
