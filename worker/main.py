"""`pagemesh worker`: load the model, allocate the KV cache, serve the Worker API."""

from __future__ import annotations

import argparse
import time

from protos.pagemesh.v1 import worker_pb2_grpc
from services.args import add_worker_args
from services.grpc_server import Service, start_server, wait_for_termination


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pagemesh worker", description="Serve a model's forward passes over gRPC."
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--address", default="127.0.0.1:50053", help="host:port or unix:///path.sock")
    add_worker_args(p)
    a = p.parse_args(argv)

    from worker.model_runner import ModelRunner
    from worker.service import WorkerServicer

    start = time.perf_counter()
    print(f"worker: loading {a.model} ...", flush=True)
    runner = ModelRunner(
        a.model,
        dtype=a.dtype,
        device=a.device,
        block_size=a.block_size,
        max_model_len=a.max_model_len,
        kv_cache_memory=a.kv_cache_memory,
        gpu_memory_utilization=a.gpu_memory_utilization,
        num_threads=a.num_threads,
    )
    cap = runner.capacity
    print(
        f"worker: loaded in {time.perf_counter() - start:.1f}s: {cap.dtype} on {cap.device}, "
        f"{cap.num_blocks} KV blocks of {cap.block_size} tokens, max_model_len {cap.max_model_len}",
        flush=True,
    )
    server = start_server(
        [a.address],
        [Service(worker_pb2_grpc.add_WorkerServicer_to_server, WorkerServicer(runner), "pagemesh.v1.Worker")],
    )
    print(f"worker: serving on {a.address}", flush=True)
    wait_for_termination(server)
    return 0
