"""The real services over real gRPC: `pagemesh serve`, the public Inference API, health, restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack import descendants, start_stack, stop_stack, wait_until_idle

from pagemesh import LLM, SamplingParams
from protos.pagemesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

FRANCE = [common_pb2.ChatMessage(role="user", content="What is the capital of France?")]


def inference(stack) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(stack.grpc_address))


def generate(stub, **fields) -> tuple[str, list[int], list[inference_pb2.GenerateResponse]]:
    msgs = list(stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=120))
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids], msgs


def service_addresses(log: str) -> dict[str, tuple[str, int]]:
    found = re.findall(r"launcher: (\w+) is healthy at (\S+) \(pid (\d+)\)", log)
    return {name: (addr, int(pid)) for name, addr, pid in found}


def test_grpc_client_generates_from_the_scheduler(stack):
    text, ids, msgs = generate(
        inference(stack),
        chat=common_pb2.ChatInput(messages=FRANCE),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=32),
    )
    assert "Paris" in text
    assert msgs[0].prompt_token_ids and msgs[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert msgs[-1].usage.completion_tokens == len(ids) and msgs[-1].usage.prompt_tokens == len(
        msgs[0].prompt_token_ids
    )


def test_grpcurl_via_reflection(stack):
    grpcurl = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "grpcurl"
    if not grpcurl.exists():
        grpcurl = Path(".venv/bin/grpcurl")
    listing = subprocess.run(
        [str(grpcurl), "-plaintext", stack.grpc_address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "pagemesh.v1.Inference" in listing and "grpc.health.v1.Health" in listing
    body = json.dumps(
        {
            "chat": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
            "sampling": {"temperature": 0, "maxTokens": 32},
        }
    )
    out = subprocess.run(
        [str(grpcurl), "-plaintext", "-d", body, stack.grpc_address, "pagemesh.v1.Inference/Generate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = "".join(
        json.loads(chunk).get("text", "") for chunk in re.split(r"(?<=})\n(?={)", out.stdout.strip())
    )
    assert "Paris" in text


def test_every_service_answers_health_check(stack):
    services = service_addresses(stack.log())
    assert set(services) == {"tokenizer", "worker", "scheduler", "gateway"}
    for name in ("tokenizer", "worker", "scheduler"):
        addr = services[name][0]
        with grpc.insecure_channel(addr) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with grpc.insecure_channel(stack.grpc_address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="pagemesh.v1.Inference"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stack_output_equals_in_process_llm_with_16_concurrent_streams(stack):
    llm = LLM(str(stack.model_dir), dtype="float32")
    tok = llm.get_tokenizer()
    prompts = [
        f"Question {i}: name a famous {w} and say why in one sentence."
        for i, w in enumerate(
            [
                "painter",
                "river",
                "city",
                "scientist",
                "poem",
                "bridge",
                "composer",
                "mountain",
                "novel",
                "king",
                "queen",
                "island",
                "planet",
                "film",
                "ship",
                "garden",
            ]
        )
    ]
    params = SamplingParams(temperature=0, max_tokens=48)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    stub = inference(stack)

    def one(p: str) -> list[int]:
        return generate(stub, text=p, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=48))[1]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == expected
    assert tok.decode(got[0])


def test_bad_input_is_invalid_argument_and_unknown_model_not_found(stack):
    stub = inference(stack)
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, text="hi", sampling=common_pb2.SamplingParams(top_p=1.5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, text="hi", model="no-such-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, token_ids=common_pb2.TokenIds(ids=[1] * 9000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in e.value.details()
    # and the server still serves
    assert (
        "Paris"
        in generate(
            stub,
            chat=common_pb2.ChatInput(messages=FRANCE),
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=32),
        )[0]
    )


def test_cancelled_stream_frees_its_blocks(stack):
    stub = inference(stack)
    call = stub.Generate(
        inference_pb2.GenerateRequest(
            text="Tell me a long story.", sampling=common_pb2.SamplingParams(max_tokens=500, ignore_eos=True)
        )
    )
    for i, _ in enumerate(call):
        if i == 5:
            call.cancel()
            break
    stats = wait_until_idle(stub)
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks


def test_launcher_restarts_a_killed_tokenizer_and_stops_cleanly(default_model_dir, tmp_path):
    s = start_stack(default_model_dir, tmp_path / "serve.log", "--max-model-len", "2048")
    try:
        services = service_addresses(s.log())
        children = descendants(s.proc.pid)
        assert len(children) >= 4
        os.kill(services["tokenizer"][1], signal.SIGKILL)
        mark = len(s.log())
        s.wait_for_log("tokenizer exited", timeout=30, after=mark)
        s.wait_for_log("tokenizer is healthy", timeout=60, after=mark)
        stub = inference(s)
        text = ""
        for _ in range(20):  # the scheduler's channel reconnects to the new tokenizer
            try:
                text = generate(
                    stub,
                    chat=common_pb2.ChatInput(messages=FRANCE),
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=32),
                )[0]
                break
            except grpc.RpcError:
                time.sleep(0.5)
        assert "Paris" in text
        children = descendants(s.proc.pid)
    finally:
        code = stop_stack(s)
    assert code == 0
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert alive == [], f"left behind: {alive}"


def test_stream_interval_batches_tokens_and_changes_nothing_else(stack, default_model_dir, tmp_path):
    """`--stream-interval 4`: the first token alone, then messages of 4 tokens and the rest at the
    end; the tokens, text, logprobs, stop strings and usage are those of the default stack."""
    batched = start_stack(
        default_model_dir, tmp_path / "serve.log", "--dtype", "float32", "--stream-interval", "4"
    )
    try:
        cases = [
            dict(
                text="Count from one to twenty:",
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=23),
            ),
            dict(  # a stop string: found as soon as it is generated, not when the held tokens go out
                chat=common_pb2.ChatInput(messages=FRANCE),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=40, stop=["Paris"]),
            ),
            dict(
                text="The capital of France is",
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=9, logprobs=2),
            ),
            dict(  # n > 1: every choice is held and sent on its own
                text="Once upon a time",
                sampling=common_pb2.SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=10),
            ),
        ]
        for fields in cases:
            want = generate(inference(stack), **fields)[2]
            got = generate(inference(batched), **fields)[2]
            for index in {m.index for m in want[1:]}:
                mine = [m for m in got[1:] if m.index == index]
                theirs = [m for m in want[1:] if m.index == index]
                assert "".join(m.text for m in mine) == "".join(m.text for m in theirs)
                assert [t for m in mine for t in m.token_ids] == [t for m in theirs for t in m.token_ids]
                assert [lp for m in mine for lp in m.logprobs] == [lp for m in theirs for lp in m.logprobs]
                sizes = [len(m.token_ids) for m in mine]
                assert sizes[0] == 1 and all(s == 4 for s in sizes[1:-1]) and 1 <= sizes[-1] <= 4, sizes
            last_want, last_got = want[-1], got[-1]
            # (cached_tokens differ: the shared stack has seen these prompts in other tests)
            assert (
                last_got.finish_reason,
                last_got.stop_string,
                last_got.usage.prompt_tokens,
                last_got.usage.completion_tokens,
            ) == (
                last_want.finish_reason,
                last_want.stop_string,
                last_want.usage.prompt_tokens,
                last_want.usage.completion_tokens,
            )
        assert len(got) < len(want)

        # Through the gateway: SSE chunks of several tokens, each with its tokens' logprobs.
        def stream(s) -> list:
            c = openai.OpenAI(base_url=s.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
            return list(
                c.completions.create(
                    model=s.model_dir.name,
                    prompt="The capital of France is",
                    max_tokens=9,
                    temperature=0,
                    logprobs=2,
                    stream=True,
                )
            )

        def per_chunk(chunks) -> list[list[str]]:
            return [ch.choices[0].logprobs.tokens for ch in chunks if ch.choices[0].logprobs]

        want_chunks, got_chunks = stream(stack), stream(batched)
        assert [len(t) for t in per_chunk(want_chunks)] == [1] * 9
        assert [len(t) for t in per_chunk(got_chunks)] == [1, 4, 4]
        assert sum(per_chunk(got_chunks), []) == sum(per_chunk(want_chunks), [])
        text = ["".join(ch.choices[0].text for ch in chunks) for chunks in (want_chunks, got_chunks)]
        assert text[0] == text[1] and "Paris" in text[1]
    finally:
        stop_stack(batched)
