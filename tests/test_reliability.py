"""Bad days: the worker killed mid-stream, and overload. Nothing in flight is lost."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from stack import start_stack, stop_stack, wait_until_idle

from protos.pagemesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

PROMPTS = [f"Write a short paragraph about the number {i} and why it matters." for i in range(16)]


def stream_ids(stub, prompt: str, on_token=None) -> tuple[list[int], str]:
    req = inference_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    )
    ids: list[int] = []
    text = ""
    for msg in stub.Generate(req, timeout=180):
        ids += msg.token_ids
        text += msg.text
        if on_token and msg.token_ids:
            on_token()
    return ids, text


def test_worker_killed_mid_stream_all_requests_resume_identically(default_model_dir, tmp_path):
    s = start_stack(
        default_model_dir,
        tmp_path / "serve.log",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--worker-recovery-timeout",
        "120",
    )
    try:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(s.grpc_address))
        with ThreadPoolExecutor(16) as pool:
            undisturbed = list(pool.map(lambda p: stream_ids(stub, p), PROMPTS))

        worker_pid = int(re.findall(r"launcher: worker is healthy at \S+ \(pid (\d+)\)", s.log())[-1])
        tokens_seen = 0
        lock = threading.Lock()
        killed = threading.Event()

        def on_token() -> None:
            nonlocal tokens_seen
            with lock:
                tokens_seen += 1
                # every stream is well under way: kill the worker with all 16 in flight
                if tokens_seen == 16 * 12 and not killed.is_set():
                    killed.set()
                    os.kill(worker_pid, signal.SIGKILL)

        mark = len(s.log())
        with ThreadPoolExecutor(16) as pool:
            disturbed = list(pool.map(lambda p: stream_ids(stub, p, on_token), PROMPTS))
        assert killed.is_set()
        assert disturbed == undisturbed  # same tokens and text: nothing duplicated, nothing missing
        log = s.log()[mark:]
        assert "worker exited" in log and "restarting" in log
        assert "resuming" in log
        stats = stub.GetStats(inference_pb2.GetStatsRequest())
        assert stats.num_worker_losses >= 1 and stats.num_resumed_requests >= 1
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks
    finally:
        stop_stack(s)


def test_overload_refuses_quickly_and_admitted_requests_finish(default_model_dir, tmp_path):
    s = start_stack(
        default_model_dir,
        tmp_path / "serve.log",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "2",
        "--max-waiting-requests",
        "4",
    )
    try:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(s.grpc_address))

        def one(i: int) -> tuple[str, float]:
            start = time.monotonic()
            try:
                stream_ids(stub, f"Count from {i} to {i + 30}.")
                return "ok", time.monotonic() - start
            except grpc.RpcError as e:
                return e.code().name, time.monotonic() - start

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(20)))
        codes = [c for c, _ in results]
        assert set(codes) <= {"ok", "RESOURCE_EXHAUSTED"}, codes
        assert 2 <= codes.count("ok") <= 6 + 2  # running + waiting bound (+ requests finishing meanwhile)
        assert codes.count("RESOURCE_EXHAUSTED") >= 10
        refused = [t for c, t in results if c == "RESOURCE_EXHAUSTED"]
        assert max(refused) < 5.0  # refused at once, not after waiting
        stats = stub.GetStats(inference_pb2.GetStatsRequest())
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks
        assert s.proc.poll() is None
    finally:
        stop_stack(s)


def test_requests_that_lose_their_gateway_are_aborted(default_model_dir, tmp_path):
    """SIGKILL the gateway under 4 streams: the scheduler aborts their requests (no leaked blocks),
    and the launcher brings a new gateway up."""
    import httpx

    s = start_stack(default_model_dir, tmp_path / "serve.log", "--max-model-len", "1024")
    try:
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(s.grpc_address))
        gateway_pid = int(re.findall(r"launcher: gateway is healthy at \S+ \(pid (\d+)\)", s.log())[-1])
        started = threading.Barrier(5)

        def stream(i: int) -> None:
            body = {
                "model": default_model_dir.name,
                "prompt": f"Story {i}:",
                "max_tokens": 900,
                "ignore_eos": True,
                "stream": True,
            }
            try:
                with httpx.stream("POST", s.http_url + "/v1/completions", json=body, timeout=60) as r:
                    for n, _ in enumerate(r.iter_lines()):
                        if n == 3:
                            started.wait(timeout=60)
            except (httpx.HTTPError, threading.BrokenBarrierError):
                pass  # the gateway died under us: expected

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        assert stub.GetStats(inference_pb2.GetStatsRequest()).num_running == 4
        mark = len(s.log())
        os.kill(gateway_pid, signal.SIGKILL)
        stats = wait_until_idle(stub)
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_blocks
        s.wait_for_log("gateway is healthy", timeout=60, after=mark)
        assert httpx.get(s.http_url + "/health", timeout=10).status_code == 200
        for t in threads:
            t.join(timeout=30)
    finally:
        stop_stack(s)
