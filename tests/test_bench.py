"""`pagemesh bench serve` against the real services: a few short requests, closed and open loop."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from pagemesh.bench import serve

pytestmark = pytest.mark.slow

SHORT = ["--num-prompts", "4", "--input-len", "24", "--output-len", "8", "--num-warmups", "1"]


def run(stack, tmp_path, *flags: str) -> dict:
    out = tmp_path / "bench.json"
    assert serve.main(["--base-url", stack.http_url, *SHORT, *flags, "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def check_sane(s: dict) -> None:
    assert s["errors"] == 0 and s["completed"] == 4
    assert s["total_output_tokens"] == 4 * 8 and s["output_tokens_from_usage"]
    # pagemesh has /tokenize, so every prompt is exactly --input-len tokens.
    assert s["prompts_tokenized_by"] == "vllm"
    assert s["total_input_tokens"] == 4 * 24
    assert all(r["prompt_tokens"] == 24 and r["output_tokens"] == 8 for r in s["requests"])
    assert 0 < s["median_ttft_ms"] <= s["p99_ttft_ms"] <= s["p99_e2el_ms"]
    assert s["mean_tpot_ms"] > 0 and s["mean_itl_ms"] > 0
    assert s["mean_e2el_ms"] >= s["mean_ttft_ms"]
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0
    assert math.isclose(s["output_throughput"], 32 / s["duration_s"])


def test_closed_loop_with_goodput(stack, tmp_path):
    s = run(stack, tmp_path, "--max-concurrency", "2", "--goodput", "ttft:600000", "e2el:600000")
    check_sane(s)
    assert s["max_concurrency"] == 2
    # SLOs of ten minutes: every request meets them, so goodput is the request rate.
    assert math.isclose(s["request_goodput"], s["request_throughput"])


def test_poisson_arrivals(stack, tmp_path):
    s = run(stack, tmp_path, "--request-rate", "20", "--seed", "1")
    check_sane(s)
    assert s["request_rate"] == 20


def test_shared_prefix_prompts_share_exactly_the_prefix():
    class FakeTokenizer:  # one token per word, as SmolLM2's tokenizer does for WORDS
        async def tokenize(self, text: str) -> list[int]:
            return [serve.WORDS.index(w) for w in text.split()]

        async def detokenize(self, tokens: list[int]) -> str:
            return "".join(" " + serve.WORDS[t] for t in tokens)

    prompts = asyncio.run(serve.make_prompts(FakeTokenizer(), 3, 10, 5, seed=0))  # type: ignore[arg-type]
    words = [p.text.split() for p in prompts]
    assert all(p.tokens == 15 and len(w) == 15 for p, w in zip(prompts, words, strict=True))
    assert words[0][:5] == words[1][:5] == words[2][:5]
    assert len({tuple(w[5:]) for w in words}) == 3
