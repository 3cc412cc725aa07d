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


def test_chat_endpoint(stack, tmp_path):
    s = run(stack, tmp_path, "--endpoint", "/v1/chat/completions", "--max-concurrency", "2")
    assert s["errors"] == 0 and s["completed"] == 4 and s["total_output_tokens"] == 4 * 8
    assert s["endpoint"] == "/v1/chat/completions" and s["output_tokens_from_usage"]
    # The prompt went in as a user message: the chat template's tokens come on top of its 24.
    assert all(r["prompt_tokens"] > 24 for r in s["requests"])
    assert 0 < s["median_ttft_ms"] <= s["p99_e2el_ms"] and s["mean_itl_ms"] > 0


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


def test_compare_runs_every_engine_and_reports_cpu_and_memory(tmp_path):
    """`make bench` in miniature: HF, one service stack and in-process, with its report written."""
    from pagemesh.bench import compare

    docs, out = tmp_path / "benchmarks.md", tmp_path / "compare.json"
    docs.write_text("# Benchmarks\n\nhand-written text that must survive\n")
    skip = ["--skip", "llamacpp", "stack-int8", "stack-interval"]
    assert compare.main(["--quick", *skip, "--write", "--docs", str(docs), "--json-out", str(out)]) == 0

    res = json.loads(out.read_text())
    (stack,) = res["servers"]
    assert stack["engine"] == compare.STACK and [lv["max_concurrency"] for lv in stack["levels"]] == [1, 2]
    assert all(lv["errors"] == 0 and lv["total_output_tokens"] > 0 for lv in stack["levels"])
    assert {o["id"] for o in res["offline"]} == {"hf", "inprocess"}
    assert all(o["output_tok_per_s"] > 0 for o in res["offline"])
    # In-process runs the stack's highest level as one batch: as many prompts, 2 at a time.
    (inprocess,) = (o for o in res["offline"] if o["id"] == "inprocess")
    assert inprocess["num_prompts"] == stack["levels"][-1]["num_prompts"] == 4

    services = {"launcher", "tokenizer", "worker", "scheduler", "gateway"}
    assert set(stack["peak_rss_mib"]) == services | {"total"}
    assert all(stack["life_peak_rss_mib"][p] >= stack["peak_rss_mib"][p] > 0 for p in services)
    cpu = stack["cpu_seconds"]
    assert set(cpu) == services | {"client"}
    # The timed requests ran the model in the worker and streamed through the client.
    assert cpu["worker"] > 0 and cpu["client"] > 0 and all(s >= 0 for s in cpu.values())

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text that must survive\n")
    assert compare.START_MARKER in text and compare.END_MARKER in text
    assert "### CPU during the 2-stream run" in text and "| pagemesh serve | all but the worker |" in text
    assert "on the same workload, 4 prompts 2 at a time" in text and f"- {compare.STACK}: " in text
    assert (tmp_path / "bench_concurrency.png").exists()
