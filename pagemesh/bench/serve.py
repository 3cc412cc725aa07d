"""`pagemesh bench serve`: an online serving benchmark for any OpenAI-compatible `/v1/completions`
endpoint (pagemesh, vLLM, llama.cpp's llama-server), with vLLM's `bench serve` habits.

Every request streams (`stream: true`, `stream_options.include_usage`), greedy, with `ignore_eos`
so that each one makes exactly `--output-len` tokens. Requests arrive either all at once
(`--request-rate inf`, the default) or as a Poisson process (`--request-rate R`, `--burstiness`
for gamma arrivals); `--max-concurrency` caps how many are in flight, so `--max-concurrency N`
with the default rate is a closed loop of N streams.

Prompts are random words. When the server has `/tokenize` and `/detokenize` (vLLM and pagemesh
shapes, or llama.cpp's) each prompt is cut to exactly `--input-len` tokens of the server's own
tokenizer; otherwise `--input-len` words are sent, which is one token per word for SmolLM2-like
BPE vocabularies (every word in WORDS is a single token there).

Metrics (milliseconds): TTFT, time from sending to the first chunk with text; TPOT, per request
(E2E - TTFT) / (output tokens - 1); ITL, gaps between successive chunks with text; E2EL, the
whole request. Output tokens come from the server's usage block when it sends one, else one per
chunk with text. Goodput (`--goodput ttft:MS tpot:MS e2el:MS`) is requests/s meeting every SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from tqdm import tqdm

# Common English words that are each one token (with their leading space) for SmolLM2's BPE, so a
# prompt of N of them is N tokens even without a tokenizer. Checked against tokenizer.json.
WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education river stone cloud garden window forest bridge market village
mountain island ocean summer winter letter music paper table light green black white small large
early young strong simple
""".split()

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class Prompt:
    text: str
    tokens: int | None  # known when the server tokenized it; else from usage (or words) later


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, send to end of stream
    itl: list[float] = field(default_factory=list)  # seconds between chunks with text
    tokens_from_usage: bool = False

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------------------------------------
# Prompts


class TokenizerApi:
    """The server's /tokenize and /detokenize. vLLM and pagemesh take {"prompt"} and answer
    {"tokens"} / {"prompt"}; llama.cpp takes {"content"} and answers {"tokens"} / {"content"}."""

    def __init__(self, client: aiohttp.ClientSession, base_url: str, model: str, shape: str) -> None:
        self.client, self.base_url, self.model, self.shape = client, base_url, model, shape

    @classmethod
    async def probe(cls, client: aiohttp.ClientSession, base_url: str, model: str) -> TokenizerApi | None:
        for shape in ("vllm", "llamacpp"):
            api = cls(client, base_url, model, shape)
            try:
                if await api.tokenize(" hello world"):
                    return api
            except (aiohttp.ClientError, ValueError, KeyError, TypeError):
                pass
        return None

    async def tokenize(self, text: str) -> list[int]:
        if self.shape == "vllm":
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "add_special": False}
        async with self.client.post(f"{self.base_url}/tokenize", json=body) as r:
            r.raise_for_status()
            return [int(t) for t in (await r.json())["tokens"]]

    async def detokenize(self, tokens: list[int]) -> str:
        body: dict[str, Any] = {"tokens": tokens}
        if self.shape == "vllm":
            body["model"] = self.model
        async with self.client.post(f"{self.base_url}/detokenize", json=body) as r:
            r.raise_for_status()
            return str((await r.json())["prompt" if self.shape == "vllm" else "content"])


def random_words(rng: random.Random, n: int) -> str:
    # The leading space keeps the first word's token the same wherever the segment is placed.
    return "".join(" " + rng.choice(WORDS) for _ in range(n))


async def exact_tokens(api: TokenizerApi, rng: random.Random, n: int) -> list[int]:
    """n tokens of random words, cut at a token boundary so that the text re-tokenizes the same."""
    words = n
    while True:
        ids = await api.tokenize(random_words(rng, words))
        if len(ids) >= n:
            return ids[:n]
        words += n - len(ids) + 1  # a tokenizer that merges words: add some and try again


async def make_prompts(
    api: TokenizerApi | None, count: int, input_len: int, prefix_len: int, seed: int
) -> list[Prompt]:
    """`count` prompts of `prefix_len` shared tokens followed by `input_len` distinct ones (vLLM's
    random dataset lays out its --random-prefix-len the same way). Random words make the tails
    differ from their first block on, so the prefix cache can only help with the shared prefix."""
    rng = random.Random(seed)
    if api is None:
        prefix = random_words(rng, prefix_len)
        return [Prompt(prefix + random_words(rng, input_len), None) for _ in range(count)]
    prefix_ids = await exact_tokens(api, rng, prefix_len) if prefix_len else []
    prompts = []
    for _ in range(count):
        ids = prefix_ids + await exact_tokens(api, rng, input_len)
        prompts.append(Prompt(await api.detokenize(ids), len(ids)))
    return prompts


# ---------------------------------------------------------------------------------------------
# Requests


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream, up to `data: [DONE]`. Reads whatever bytes arrived and
    splits lines itself: one await per network read rather than per line keeps the client cheap
    (it shares the machine with the server it measures)."""
    pending = b""
    async for data in response.content.iter_any():
        lines = (pending + data).split(b"\n")
        pending = lines.pop()  # an incomplete last line waits for the next read
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                event = json.loads(payload)
            except ValueError:  # not JSON, or not UTF-8
                continue
            if isinstance(event, dict):  # anything else is no OpenAI chunk: skip it rather than crash
                yield event


async def send_request(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], prompt: Prompt
) -> RequestResult:
    result = RequestResult(prompt_tokens=prompt.tokens)
    start = time.perf_counter()
    last: float | None = None
    chunks_with_text = 0
    try:
        async with client.post(url, json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:300]}"
                return result
            async for event in sse_events(response):
                now = time.perf_counter()
                if event.get("error"):
                    result.error = f"stream error: {str(event['error'])[:300]}"
                    break
                for choice in event.get("choices") or []:
                    if not (choice.get("text") or (choice.get("delta") or {}).get("content")):
                        continue  # completions carry "text", chat a "delta" with "content"
                    chunks_with_text += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                usage = event.get("usage")
                if usage and isinstance(usage.get("completion_tokens"), int):
                    result.output_tokens = usage["completion_tokens"]
                    result.tokens_from_usage = True
                    if isinstance(usage.get("prompt_tokens"), int):
                        result.prompt_tokens = usage["prompt_tokens"]
    except (aiohttp.ClientError, TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    if not result.tokens_from_usage:
        result.output_tokens = chunks_with_text
    if result.error is None and last is None:
        result.error = "no text received"
    result.ok = result.error is None
    return result


async def arrivals(count: int, rate: float, burstiness: float, seed: int) -> AsyncIterator[int]:
    """Request indices at their arrival times: all at once for an infinite rate, else gamma
    intervals with mean 1/rate (burstiness 1 is a Poisson process, as in vLLM)."""
    rng = random.Random(seed)
    for i in range(count):
        yield i
        if math.isfinite(rate) and i + 1 < count:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def describe(name: str, seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    mean = sum(ms) / len(ms) if ms else math.nan
    return {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"p99_{name}_ms": percentile(ms, 99),
    }


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS or not value:
            raise argparse.ArgumentTypeError(f"--goodput takes KEY:MS with KEY in {SLO_KEYS}, not {item!r}")
        slos[key] = float(value)
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(measured[k] * 1000 <= ms for k, ms in slos.items())


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    summary: dict[str, Any] = {
        "duration_s": duration,
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0].error if errors else None,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "output_tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else False,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    summary |= describe("ttft", [r.ttft for r in ok])
    summary |= describe("tpot", [t for r in ok if (t := r.tpot) is not None])
    summary |= describe("itl", [gap for r in ok for gap in r.itl])
    summary |= describe("e2el", [r.latency for r in ok])
    if slos:
        summary["goodput_slos_ms"] = slos
        summary["request_goodput"] = sum(meets_slos(r, slos) for r in ok) / duration
    return summary


# ---------------------------------------------------------------------------------------------
# The run


async def first_model(client: aiohttp.ClientSession, base_url: str) -> str:
    async with client.get(f"{base_url}/v1/models") as r:
        r.raise_for_status()
        return str((await r.json())["data"][0]["id"])


class Meter(Protocol):
    """Something to start and stop around the timed requests only (not prompts, not warm-ups)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


async def benchmark(a: argparse.Namespace, meter: Meter | None = None) -> dict[str, Any]:
    """Run one benchmark as parsed by `parser()`; returns the summary (also what --json-out holds)."""
    base_url = a.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    slos = parse_goodput(a.goodput)
    # No connection cap (limit=0): aiohttp's default pool (100) would queue requests inside the
    # client and count that wait as TTFT. A connection per request (force_close): aiohttp does not
    # retry a POST on a kept-alive connection the server has meanwhile closed, which llama-server
    # does (a loopback connect is ~0.1 ms of TTFT). No proxy from the environment (trust_env stays
    # False): it would distort latency.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=a.timeout)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as client:
        model = a.model or await first_model(client, base_url)
        api = await TokenizerApi.probe(client, base_url, model) if a.tokenize else None
        prompts = await make_prompts(
            api, a.num_prompts + a.num_warmups, a.input_len, a.shared_prefix_len, a.seed
        )
        # Warm-up prompts come from the same generator but are never measured, so they warm the
        # server without putting the measured prompts into its prefix cache (a shared prefix does get
        # cached, as a common system prompt would be).
        warmups, prompts = prompts[a.num_prompts :], prompts[: a.num_prompts]

        chat = a.endpoint.rstrip("/").endswith("/chat/completions")

        def body(prompt: Prompt, max_tokens: int) -> dict[str, Any]:
            # A chat endpoint gets the prompt as one user message (its template adds tokens, which
            # the usage's prompt_tokens then counts).
            text = (
                {"messages": [{"role": "user", "content": prompt.text}]} if chat else {"prompt": prompt.text}
            )
            b: dict[str, Any] = {
                "model": model,
                **text,
                "max_tokens": max_tokens,
                "temperature": a.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if a.ignore_eos:
                b["ignore_eos"] = True
            return b

        url = base_url + a.endpoint
        for w in warmups:
            r = await send_request(client, url, body(w, min(a.output_len, 8)), w)
            if not r.ok:
                raise RuntimeError(f"warm-up request to {url} failed: {r.error}")

        limit = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else contextlib.nullcontext()
        # On stderr, a few refreshes a second: a long run shows how far it is without costing the
        # measured machine anything to speak of.
        bar = tqdm(total=a.num_prompts, desc="requests", unit="req", disable=a.disable_tqdm, file=sys.stderr)

        async def one(i: int) -> RequestResult:
            async with limit:
                result = await send_request(client, url, body(prompts[i], a.output_len), prompts[i])
            bar.update(1)
            return result

        if meter:
            meter.start()
        start = time.perf_counter()
        try:
            tasks = [
                asyncio.create_task(one(i))
                async for i in arrivals(a.num_prompts, a.request_rate, a.burstiness, a.seed)
            ]
            results = await asyncio.gather(*tasks)
        finally:
            bar.close()
        duration = time.perf_counter() - start
        if meter:
            meter.stop()

    summary = {
        "base_url": base_url,
        "endpoint": a.endpoint,
        "model": model,
        "num_prompts": a.num_prompts,
        "input_len": a.input_len,
        "shared_prefix_len": a.shared_prefix_len,
        "output_len": a.output_len,
        "prompts_tokenized_by": (api.shape if api else "words (no /tokenize)"),
        "max_concurrency": a.max_concurrency,
        "request_rate": a.request_rate,
        "burstiness": a.burstiness,
        "seed": a.seed,
        "ignore_eos": a.ignore_eos,
    } | summarize(results, duration, slos)
    summary["requests"] = [
        {
            "ok": r.ok,
            "error": r.error,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "ttft_ms": r.ttft * 1000,
            "e2el_ms": r.latency * 1000,
        }
        for r in results
    ]
    return summary


def report(s: dict[str, Any]) -> str:
    rate = "inf" if math.isinf(s["request_rate"]) else f"{s['request_rate']:g}"
    lines = [
        f"== {s['base_url']}{s['endpoint']}  model {s['model']!r}",
        f"prompts {s['num_prompts']} x ({s['shared_prefix_len']}+{s['input_len']} in, "
        f"{s['output_len']} out), "
        f"max concurrency {s['max_concurrency'] or 'none'}, request rate {rate}/s, "
        f"prompts by {s['prompts_tokenized_by']}",
        f"completed {s['completed']}, errors {s['errors']}"
        + (f" (first: {s['first_error']})" if s["errors"] else ""),
        f"duration {s['duration_s']:.2f} s, input tokens {s['total_input_tokens']}, "
        f"output tokens {s['total_output_tokens']}"
        + ("" if s["output_tokens_from_usage"] else " (counted from chunks: no usage block)"),
        f"output tok/s {s['output_throughput']:.1f}, total tok/s {s['total_token_throughput']:.1f}, "
        f"requests/s {s['request_throughput']:.2f}",
    ]
    if "request_goodput" in s:
        lines.append(f"goodput {s['request_goodput']:.2f} requests/s under {s['goodput_slos_ms']} (ms)")
    lines.append(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        row = [s[f"{k}_{name}_ms"] for k in ("mean", "median", "p99")]
        lines.append(f"{name.upper():<6}" + "".join(f"{v:>10.1f}" for v in row))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagemesh bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument(
        "--endpoint",
        default="/v1/completions",
        help="/v1/completions, or /v1/chat/completions (one user message)",
    )
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="distinct prompt tokens per request")
    p.add_argument(
        "--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with, before --input-len"
    )
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (closed loop when set)"
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (inf: all at once)"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--tokenize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="size prompts with the server's /tokenize and /detokenize when it has them",
    )
    p.add_argument("--num-warmups", type=int, default=1, help="unmeasured short requests sent first")
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout, seconds")
    p.add_argument("--json-out", default=None, help="write the summary and per-request records here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    a = p.parse_args(argv)
    try:
        parse_goodput(a.goodput)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.num_prompts < 1 or a.input_len < 1 or a.output_len < 1 or a.shared_prefix_len < 0:
        p.error("--num-prompts, --input-len and --output-len must be positive")
    if a.max_concurrency is not None and a.max_concurrency < 1:
        p.error("--max-concurrency must be positive")
    if not a.request_rate > 0 or not a.burstiness > 0:
        p.error("--request-rate and --burstiness must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        summary = asyncio.run(benchmark(a))
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
        print(f"pagemesh bench serve: {e}", file=sys.stderr)
        return 1
    print(report(summary))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
