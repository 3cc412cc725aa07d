"""The HTTP side of "faults, overload and bad input", against the real services (the session stack):
a table of bad requests, schemathesis fuzzing of /openapi.json, and a soak of cut streams."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from protos.pagemesh.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}
JSON = {"content-type": "application/json"}


def _raw(text: str) -> bytes:
    return text.encode()


# (path, body: a dict sent as JSON or raw bytes, expected status, expected param)
BAD_INPUTS = {
    # not JSON at all, or not an object
    "malformed json": ("/v1/completions", b'{"prompt": "x",', 400, None),
    "json array": ("/v1/completions", b"[1, 2]", 400, None),
    "empty body": ("/v1/chat/completions", b"", 400, None),
    "invalid utf-8": ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    "lone surrogate": ("/v1/completions", _raw(r'{"prompt": "a\ud800"}'), 400, "prompt"),
    "surrogate in content": (
        "/v1/chat/completions",
        _raw(r'{"messages": [{"role": "user", "content": "\udc00"}]}'),
        400,
        "messages[0].content",
    ),
    "NaN": ("/v1/completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p"),
    "body over 8 MiB": ("/v1/completions", b'{"prompt": "' + b"a" * (8 << 20) + b'"}', 413, None),
    # wrong types
    "prompt number": ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    "prompt nested too deep": ("/v1/completions", {"prompt": [[[1]]]}, 400, "prompt"),
    "temperature string": ("/v1/completions", COMPLETION | {"temperature": "hot"}, 400, "temperature"),
    "n float": ("/v1/completions", COMPLETION | {"n": 1.5}, 400, "n"),
    "stream string": ("/v1/chat/completions", CHAT | {"stream": "yes"}, 400, "stream"),
    "n numeric string": ("/v1/completions", COMPLETION | {"n": "2"}, 400, "n"),
    "top_p numeric string": ("/v1/completions", COMPLETION | {"top_p": "0.5"}, 400, "top_p"),
    "echo as 1": ("/v1/completions", COMPLETION | {"echo": 1}, 400, "echo"),
    "stop number": ("/v1/chat/completions", CHAT | {"stop": 7}, 400, "stop"),
    "messages not a list": ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages"),
    "content object": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": {"text": "Hi"}}]},
        400,
        "messages[0].content",
    ),
    "image part": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
    "unknown role": (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    "tokens not ints": ("/detokenize", {"tokens": ["a"]}, 400, "tokens[0]"),
    # out of range
    "n zero": ("/v1/completions", COMPLETION | {"n": 0}, 400, "n"),
    "n huge": ("/v1/chat/completions", CHAT | {"n": 10**6}, 400, "n"),
    "n over cap": ("/v1/completions", COMPLETION | {"n": 17}, 400, "n"),
    "max_tokens huge": ("/v1/completions", COMPLETION | {"max_tokens": 10**12}, 400, "max_tokens"),
    "max_tokens over context": ("/v1/completions", COMPLETION | {"max_tokens": 9000}, 400, "max_tokens"),
    "max_completion_tokens over context": (
        "/v1/chat/completions",
        CHAT | {"max_completion_tokens": 9000},
        400,
        "max_completion_tokens",
    ),
    "max_tokens negative": ("/v1/chat/completions", CHAT | {"max_tokens": -1}, 400, "max_tokens"),
    "temperature negative": ("/v1/completions", COMPLETION | {"temperature": -0.5}, 400, "temperature"),
    "top_p zero": ("/v1/completions", COMPLETION | {"top_p": 0}, 400, "top_p"),
    "top_k below -1": ("/v1/completions", COMPLETION | {"top_k": -5}, 400, "top_k"),
    "min_p over 1": ("/v1/completions", COMPLETION | {"min_p": 1.5}, 400, "min_p"),
    "frequency_penalty": (
        "/v1/completions",
        COMPLETION | {"frequency_penalty": -3},
        400,
        "frequency_penalty",
    ),
    "repetition_penalty zero": (
        "/v1/completions",
        COMPLETION | {"repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    "logprobs over 20": ("/v1/completions", COMPLETION | {"logprobs": 21}, 400, "logprobs"),
    "top_logprobs over 20": (
        "/v1/chat/completions",
        CHAT | {"logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    "seed over 64 bits": ("/v1/completions", COMPLETION | {"seed": 2**64}, 400, "seed"),
    "token id negative": ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    "token id outside vocab": ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    "detokenize outside vocab": ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    "five stop strings": ("/v1/completions", COMPLETION | {"stop": list("abcde")}, 400, "stop"),
    "empty stop string": ("/v1/completions", COMPLETION | {"stop": [""]}, 400, "stop"),
    "min_tokens over max_tokens": ("/v1/completions", COMPLETION | {"min_tokens": 3}, 400, "min_tokens"),
    "prompt over max_model_len": ("/v1/completions", {"prompt": "hi " * 8200}, 400, "prompt"),
    "chat over max_model_len": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi " * 8200}]},
        400,
        "messages",
    ),
    "too many prompts": ("/v1/completions", {"prompt": ["x"] * 2049}, 400, "prompt"),
    # empty where something is needed
    "missing prompt": ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    "empty token list": ("/v1/completions", {"prompt": []}, 400, "prompt"),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "tokenize nothing": ("/tokenize", {}, 400, "prompt"),
    # known OpenAI parameters this server cannot honour: refused by name, never silently ignored
    "suffix": ("/v1/completions", COMPLETION | {"suffix": "!"}, 400, "suffix"),
    "best_of": ("/v1/completions", COMPLETION | {"best_of": 3}, 400, "best_of"),
    "echo with logprobs": ("/v1/completions", COMPLETION | {"echo": True, "logprobs": 1}, 400, "echo"),
    "logit_bias": ("/v1/completions", COMPLETION | {"logit_bias": {"1": 5}}, 400, "logit_bias"),
    "tools": ("/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, 400, "tools"),
    "json mode": (
        "/v1/chat/completions",
        CHAT | {"response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    "top_logprobs alone": ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs"),
    "stream_options unstreamed": (
        "/v1/chat/completions",
        CHAT | {"stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    # unknown model
    "unknown model": ("/v1/completions", COMPLETION | {"model": "gpt-4"}, 404, "model"),
    "unknown model, chat": ("/v1/chat/completions", CHAT | {"model": "gpt-4", "stream": True}, 404, "model"),
    "unknown model, tokenize": ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    # wrong route or method
    "no such route": ("/v1/embeddings", {"input": "x"}, 404, None),
}


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_with_openais_envelope(stack, path, body, status, param):
    url = stack.http_url + path
    r = httpx.post(url, content=body, headers=JSON) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(stack):
    """A choice, as vLLM makes it: newer SDK parameters (store, metadata...) must not break a client."""
    r = httpx.post(
        stack.http_url + "/v1/chat/completions", json=CHAT | {"store": False, "metadata": {"a": "b"}}
    )
    assert r.status_code == 200, r.text
    r = httpx.get(stack.http_url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# -- fuzzing --------------------------------------------------------------------------------------

MAX_EXAMPLES = 50  # per operation and mode


def _bounded(body: dict) -> dict:
    """Keep generated work small, so fuzzing tests the parsing and the mapping, not the CPU: few
    tokens per choice, few choices, short prompts. Values of the wrong type are left alone, so
    validation still sees everything the fuzzer draws."""
    body = dict(body)
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(name), int) and body[name] > 4:
            body[name] = 4
    # null (or, for chat, absent) means "up to max_model_len"
    if "prompt" in body and body.get("max_tokens", 16) is None:
        body["max_tokens"] = 4
    if "messages" in body and not any(
        isinstance(body.get(k), int) for k in ("max_tokens", "max_completion_tokens")
    ):
        body["max_completion_tokens"] = 4
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    if isinstance(body.get("prompt"), list):
        body["prompt"] = [p[:64] if isinstance(p, list | str) else p for p in body["prompt"][:4]]
    if isinstance(body.get("prompt"), str):
        body["prompt"] = body["prompt"][:256]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:4]
    return body


def _server_error_events(response) -> list[str]:
    """Error events inside a 200 SSE stream that are the server's fault."""
    if "text/event-stream" not in response.headers.get("content-type", ""):
        return []
    bad = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            error = json.loads(line.removeprefix("data: ")).get("error")
            if error and error.get("type") == "server_error":
                bad.append(line)
    return bad


def _fuzz(operation, mode, base_url: str, session, failures: list[str], seen: Counter) -> None:
    """MAX_EXAMPLES cases of one operation in one mode; each 5xx (or server error event) noted."""

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if isinstance(case.body, dict):
            case.body = _bounded(case.body)
        response = case.call(base_url=base_url, session=session, timeout=30)
        seen[operation.label, response.status_code] += 1
        # /ready's 503 means "not ready", by design (a readiness probe's answer, not a failure)
        by_design = operation.label == "GET /ready" and response.status_code == 503
        if (response.status_code >= 500 and not by_design) or _server_error_events(response):
            sent = repr(case.body)[:300]
            failures.append(
                f"{operation.label} {mode}: {response.status_code} {response.text[:300]} <- {sent}"
            )

    run()


def test_fuzz_openapi_operations_never_5xx(stack):
    import requests
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(stack.http_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /tokenize",
        "POST /detokenize",
    } <= labels
    failures: list[str] = []
    seen: Counter = Counter()
    with requests.Session() as session:
        for op in operations:
            _fuzz(op, GenerationMode.POSITIVE, stack.http_url, session, failures, seen)
            try:
                _fuzz(op, GenerationMode.NEGATIVE, stack.http_url, session, failures, seen)
            except Unsatisfiable:
                pass  # nothing to get wrong: a GET without parameters (/health, /v1/models)
    print("fuzz: (operation, status) -> count:", dict(sorted(seen.items())))
    assert not failures, "\n".join(failures[:10])
    # Both paths were exercised: random bodies were refused, and some got past validation into
    # generation (random completions bodies rarely do: most draw a parameter we refuse by name).
    generation = ("POST /v1/completions", "POST /v1/chat/completions")
    assert all(seen[label, 400] for label in generation), seen
    assert any(seen[label, 200] for label in generation), seen


# -- disconnect soak ------------------------------------------------------------------------------

SOAK_STREAMS = 1000
SOAK_CONCURRENCY = 50


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def test_soak_of_cut_streams_leaks_nothing(stack):
    scheduler_pid = int(re.findall(r"launcher: scheduler is healthy at \S+ \(pid (\d+)\)", stack.log())[-1])
    rng = random.Random(1234)
    prompts = [f"The number {i} is" for i in range(50)]  # short: prefill is most of the CPU's work
    done = 0
    rss_after: dict[int, int] = {}
    outcomes: Counter = Counter()

    async def one(http: httpx.AsyncClient, i: int) -> None:
        chat = rng.random() < 0.2  # the chat template adds ~30 prompt tokens
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict = {"max_tokens": 12, "ignore_eos": True, "stream": True, "n": rng.choice((1, 1, 2))}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(prompts)}]
        else:
            body["prompt"] = rng.choice(prompts)
        cut_after_events = rng.randint(0, 8)  # 0: gone before the first token
        # Now and then a cut by time instead, often before the response (or the request) has begun.
        cut_after_seconds = rng.uniform(0.0, 0.3) if rng.random() < 0.3 else 30.0

        seen = 0

        async def read() -> str:
            nonlocal seen
            async with http.stream("POST", stack.http_url + path, json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen > cut_after_events:
                        return "cut mid-stream" if seen > 1 else "cut at the first event"
            return "read to the end"

        try:
            outcomes[await asyncio.wait_for(read(), timeout=cut_after_seconds)] += 1
        except TimeoutError:
            outcomes["cut by time, mid-stream" if seen else "cut by time, before any event"] += 1

    async def main() -> None:
        nonlocal done
        sem = asyncio.Semaphore(SOAK_CONCURRENCY)
        limits = httpx.Limits(max_connections=SOAK_CONCURRENCY, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:

            async def guarded(i: int) -> None:
                nonlocal done
                async with sem:
                    await one(http, i)
                done += 1
                if done in (200, SOAK_STREAMS):
                    rss_after[done] = _rss_kib(scheduler_pid)

            await asyncio.gather(*(guarded(i) for i in range(SOAK_STREAMS)))

    start = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - start
    assert done == SOAK_STREAMS and elapsed < 120, elapsed

    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            s = stub.GetStats(inference_pb2.GetStatsRequest())
            if (s.num_running, s.num_waiting, s.num_free_blocks) == (0, 0, s.num_blocks):
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
    growth_mib = (rss_after[SOAK_STREAMS] - rss_after[200]) / 1024
    print(
        f"soak: {SOAK_STREAMS} streams in {elapsed:.1f}s; scheduler RSS {rss_after[200] / 1024:.0f} MiB "
        f"after 200, {rss_after[SOAK_STREAMS] / 1024:.0f} MiB after {SOAK_STREAMS} ({growth_mib:+.1f} MiB); "
        f"{dict(outcomes)}"
    )
    assert growth_mib < 16
    assert outcomes["cut mid-stream"] > SOAK_STREAMS // 4 and outcomes["cut by time, before any event"] > 0
