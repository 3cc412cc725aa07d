"""`pagemesh worker`: load the model, allocate the KV cache, serve the Worker API."""

from __future__ import annotations

import argparse
import time

from protos.pagemesh.v1 import worker_pb2_grpc
from services.args import add_observability_args, add_worker_args
from services.grpc_server import Service, start_server, stop_on_signals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pagemesh worker", description="Serve a model's forward passes over gRPC."
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--address", default="127.0.0.1:50053", help="host:port or unix:///path.sock")
    add_worker_args(p)
    add_observability_args(p)
    a = p.parse_args(argv)

    from services.metrics import new_registry, serve_metrics
    from services.telemetry import setup_tracing
    from worker.model_runner import ModelRunner
    from worker.observability import StepObserver
    from worker.service import MainThreadLoop, WorkerServicer

    setup_tracing("pagemesh-worker", a.otlp_traces_endpoint)
    registry = new_registry()
    serve_metrics(registry, a.metrics_port, a.metrics_host)

    start = time.perf_counter()
    print(f"worker: loading {a.model} ...", flush=True)
    runner = ModelRunner(
        a.model,
        dtype=a.dtype,
        device=a.device,
        block_size=a.block_size,
        max_model_len=a.max_model_len,
        kv_cache_memory=a.kv_cache_memory,
        kv_cache_dtype=a.kv_cache_dtype,
        gpu_memory_utilization=a.gpu_memory_utilization,
        num_threads=a.num_threads,
        attention_backend=a.attention_backend,
        enforce_eager=a.enforce_eager,
    )
    cap = runner.capacity
    graphs_note = ", CUDA graphs" if runner.decode_graphs else ""
    kernels_note = f", CPU kernels: {runner.cpu_kernels}" if runner.cpu_kernels else ""
    kv_dtype = str(runner.kv_cache_dtype).removeprefix("torch.")
    kv_note = f" ({kv_dtype})" if runner.kv_cache_dtype != runner.dtype else ""
    print(
        f"worker: loaded in {time.perf_counter() - start:.1f}s: {cap.dtype} on {cap.device}, "
        f"{cap.num_blocks} KV blocks{kv_note} of {cap.block_size} tokens, max_model_len {cap.max_model_len}, "
        f"{runner.attention_backend} attention{graphs_note}{kernels_note}",
        flush=True,
    )
    loop = MainThreadLoop()  # the forward passes run here, on the thread that loaded the model
    servicer = WorkerServicer(runner, StepObserver(registry), loop)
    server = start_server(
        [a.address], [Service(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, "pagemesh.v1.Worker")]
    )
    print(f"worker: serving on {a.address}", flush=True)
    stop_on_signals(loop.stop)
    loop.run()
    server.stop(grace=2).wait()
    return 0
