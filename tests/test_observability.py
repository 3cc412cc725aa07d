"""Observability on the real stack: one trace per request across the four services, Prometheus
metrics that move with load, and readiness that notices a frozen worker.

One private stack serves the module, with tracing on (to an OTLP receiver built here from
opentelemetry-proto) and --max-num-seqs 4, so that a burst of requests leaves some waiting.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families
from stack import Stack, start_stack, stop_stack

GENERATE = "/pagemesh.v1.Inference/Generate"
SERVICES = {"pagemesh-gateway", "pagemesh-scheduler", "pagemesh-tokenizer", "pagemesh-worker"}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace collector: keeps every span with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for rs in request.resource_spans:
                service = _value(next(a.value for a in rs.resource.attributes if a.key == "service.name"))
                for ss in rs.scope_spans:
                    self.spans += [(service, span) for span in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, Span]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


def ancestors(span: Span, by_id: dict[bytes, tuple[str, Span]]) -> list[Span]:
    found = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id][1]
        found.append(span)
    return found


@pytest.fixture(scope="module")
def traced(default_model_dir, tmp_path_factory):
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    log = tmp_path_factory.mktemp("observability") / "serve.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 200 ms, not every 5 s
        s = start_stack(
            default_model_dir,
            log,
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "4",
            "--otlp-traces-endpoint",
            f"127.0.0.1:{port}",
        )
    try:
        yield s, receiver
    finally:
        stop_stack(s)
        server.stop(0)


def wait_for(what: str, condition: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return result


# -- helpers, without a stack ------------------------------------------------------------------------


def test_otlp_endpoint_forms():
    from services.telemetry import _otlp_url

    assert _otlp_url("127.0.0.1:4317") == "http://127.0.0.1:4317"  # plaintext, the local collector
    assert _otlp_url("localhost:4317") == "http://localhost:4317"  # not scheme "localhost"
    assert _otlp_url("grpc://collector:4317") == "http://collector:4317"
    assert _otlp_url("https://collector:4317") == "https://collector:4317"


def test_traceparent_parsing():
    from services.telemetry import span_context_of

    ctx = span_context_of(f"00-{'ab' * 16}-{'cd' * 8}-01")
    assert ctx is not None and ctx.trace_id == int("ab" * 16, 16) and ctx.span_id == int("cd" * 8, 16)
    assert span_context_of("") is None and span_context_of("garbage") is None


# -- one trace per request ------------------------------------------------------------------------------


def test_one_chat_request_is_one_trace_across_all_four_services(traced):
    s, receiver = traced
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01", "x-pagemesh-feature": "docs-search"}
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{s.http_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]

    def complete() -> list[tuple[str, Span]] | None:
        spans = receiver.trace(bytes.fromhex(trace_id))
        services = {svc for svc, _ in spans}
        generate = [sp for svc, sp in spans if svc == "pagemesh-scheduler" and sp.name == GENERATE]
        steps = [sp for svc, sp in spans if svc == "pagemesh-worker"]
        # The gateway's HTTP span ends after the response is sent, so it (and the spans between it
        # and the client call) may be exported after everything else: wait for the whole chain.
        by_id = {sp.span_id: (svc, sp) for svc, sp in spans}
        chained = generate and any(sp.kind == Span.SPAN_KIND_SERVER for sp in ancestors(generate[0], by_id))
        done = chained and "gen_ai.usage.output_tokens" in attrs(generate[0])
        return spans if services >= SERVICES and done and len(steps) >= usage["completion_tokens"] else None

    spans = wait_for("spans from all four services", complete, 20)
    by_id = {sp.span_id: (svc, sp) for svc, sp in spans}

    # The client's traceparent is continued: the gateway's HTTP span is its child, not a new root.
    (http,) = [sp for svc, sp in spans if svc == "pagemesh-gateway" and sp.kind == Span.SPAN_KIND_SERVER]
    assert http.parent_span_id == bytes.fromhex(client_span)
    assert http.name == "POST /v1/chat/completions"
    assert attrs(http)["http.response.status_code"] == 200

    # gateway HTTP span -> (FastAPI's endpoint span) -> gateway client span -> scheduler Generate span.
    (gen,) = [sp for svc, sp in spans if svc == "pagemesh-scheduler" and sp.name == GENERATE]
    assert by_id[gen.parent_span_id][0] == "pagemesh-gateway"
    assert http in ancestors(gen, by_id)
    a = attrs(gen)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == s.model_dir.name
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["pagemesh.feature"] == "docs-search"
    assert a["gen_ai.latency.time_to_first_token"] > 0 and a["gen_ai.latency.time_in_queue"] >= 0
    assert a["gen_ai.latency.e2e"] >= a["gen_ai.latency.time_to_first_token"]
    assert "pagemesh.prefix_cache_hit_tokens" in a and a["gen_ai.request.id"]

    # Tokenizer spans under the Generate span (its client call, then the tokenizer's server span).
    tok = [sp for svc, sp in spans if svc == "pagemesh-tokenizer"]
    assert any(sp.name == "/pagemesh.v1.Tokenizer/Tokenize" for sp in tok)
    for sp in tok:
        assert by_id[sp.parent_span_id][1].parent_span_id == gen.span_id

    # Worker step spans: children of the Generate span, linked to it with the request's tokens.
    # The request was alone, so its device-seconds are exactly the sum of its steps' compute time.
    steps = [sp for svc, sp in spans if svc == "pagemesh-worker"]
    assert len(steps) == usage["completion_tokens"]  # one prefill step, then one decode step per token
    for sp in steps:
        assert sp.name == "worker step" and sp.parent_span_id == gen.span_id
        assert [link.span_id for link in sp.links] == [gen.span_id]
    scheduled = sum(attrs(sp.links[0])["pagemesh.scheduled_tokens"] for sp in steps)
    prefill = usage["prompt_tokens"] - a["pagemesh.prefix_cache_hit_tokens"]
    assert scheduled == prefill + usage["completion_tokens"] - 1
    compute = sum(attrs(sp)["pagemesh.compute_seconds"] for sp in steps)
    assert a["pagemesh.device_seconds"] == pytest.approx(compute, rel=1e-6)
    assert a["pagemesh.device_seconds"] > 0


# -- Prometheus ----------------------------------------------------------------------------------------


def scrape(s: Stack) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{s.http_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_metrics_move_with_load(traced):
    s, _ = traced
    model = frozenset({("model_name", s.model_dir.name)})

    def value(samples: dict, name: str, **labels: str) -> float:
        return samples.get((name, model | frozenset(labels.items())), 0.0)

    n, max_tokens = 8, 24
    before = scrape(s)
    results: list[dict] = []

    def one(i: int) -> None:
        body = {"prompt": f"Tell me about the number {i}.", "max_tokens": max_tokens, "ignore_eos": True}
        r = httpx.post(f"{s.http_url}/v1/completions", json=body, timeout=120)
        results.append(r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    peak = {
        "vllm:num_requests_running": 0.0,
        "vllm:num_requests_waiting": 0.0,
        "vllm:kv_cache_usage_perc": 0.0,
    }
    while any(t.is_alive() for t in threads):
        during = scrape(s)
        for name in peak:
            peak[name] = max(peak[name], value(during, name))
        time.sleep(0.05)
    for t in threads:
        t.join()
    after = scrape(s)

    assert all("usage" in r for r in results), results
    assert peak["vllm:num_requests_running"] == 4  # --max-num-seqs
    assert peak["vllm:num_requests_waiting"] >= 1  # 8 requests, 4 seats
    assert 0 < peak["vllm:kv_cache_usage_perc"] <= 1
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"vllm:{histogram}_seconds_count") == n, histogram
    assert 0 < delta("vllm:inter_token_latency_seconds_count") <= n * (max_tokens - 1)
    assert delta("vllm:request_success_total", finished_reason="length") == n
    assert delta("vllm:generation_tokens_total") == n * max_tokens
    assert delta("vllm:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in results)
    assert delta("vllm:prefix_cache_queries_total") >= delta("vllm:prompt_tokens_total")
    assert value(after, "vllm:num_preemptions_total") >= 0
    assert ("vllm:prefix_cache_hits_total", model) in after
    # Every series the Grafana dashboard (deploy/grafana/pagemesh.json) queries is on the page.
    dashboard = (Path(__file__).parent.parent / "deploy" / "grafana" / "pagemesh.json").read_text()
    queried = set(re.findall(r"(?:vllm|pagemesh):[a-z0-9_]+", dashboard))
    assert queried and queried <= {name for name, _ in after}, queried - {name for name, _ in after}
    # The gateway's own metrics come on the same page.
    http_ok = {"method": "POST", "route": "/v1/completions", "status": "200"}
    assert after[("pagemesh:http_requests_total", frozenset(http_ok.items()))] >= n


# -- readiness ---------------------------------------------------------------------------------------


def ready(s: Stack) -> tuple[int, dict]:
    r = httpx.get(f"{s.http_url}/ready", timeout=10)
    return r.status_code, r.json()


def inference_health(s: Stack) -> int:
    with grpc.insecure_channel(s.grpc_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pagemesh.v1.Inference"), timeout=5
        )
    return int(reply.status)


def test_frozen_worker_turns_ready_503_and_back(traced):
    s, _ = traced
    worker = int(re.findall(r"launcher: worker is healthy at \S+ \(pid (\d+)\)", s.log())[-1])
    assert ready(s)[0] == 200
    assert httpx.get(f"{s.http_url}/health").status_code == 200

    streaming = threading.Event()

    def long_request() -> None:
        body = {"prompt": "Count to one hundred.", "max_tokens": 150, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.http_url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    streaming.set()

    threads = [threading.Thread(target=long_request) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert streaming.wait(60)
        # A wedged worker with requests running: the step in flight never finishes.
        os.kill(worker, signal.SIGSTOP)
        frozen = time.monotonic()
        code, body = wait_for("503 from /ready", lambda: (r := ready(s))[0] == 503 and r, 12)
        assert time.monotonic() - frozen < 10
        assert "stalled" in body["reason"], body
        assert body["num_running"] >= 1
        wait_for(
            "health NOT_SERVING",
            lambda: inference_health(s) == health_pb2.HealthCheckResponse.NOT_SERVING,
            5,
        )
        os.kill(worker, signal.SIGCONT)
        wait_for("200 from /ready", lambda: ready(s)[0] == 200, 15)
        for t in threads:
            t.join(120)
        wait_for("idle", lambda: ready(s)[1]["num_running"] == 0, 30)

        # Idle: no step to watch, so the scheduler probes the worker, which does not answer.
        os.kill(worker, signal.SIGSTOP)
        code, body = wait_for("503 from /ready when idle", lambda: (r := ready(s))[0] == 503 and r, 10)
        assert "health check" in body["reason"], body
        os.kill(worker, signal.SIGCONT)
        code, body = wait_for("200 from /ready", lambda: (r := ready(s))[0] == 200 and r, 10)
        assert body["status"] == "ready" and body["reason"]
        wait_for(
            "health SERVING",
            lambda: inference_health(s) == health_pb2.HealthCheckResponse.SERVING,
            5,
        )
    finally:
        os.kill(worker, signal.SIGCONT)
