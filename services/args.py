"""Command-line flags shared by `pagemesh serve` and the per-service commands, with vLLM's names."""

from __future__ import annotations

import argparse


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", default="auto", help="auto, float32, bfloat16 or float16 (auto: bf16 where fast)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument(
        "--kv-cache-memory", type=int, default=None, help="bytes for the KV cache (CPU default 1 GiB)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8"],
        default="auto",
        help="auto (the model's dtype) or int8 (CPU: rows of int8 with a scale each; twice the tokens "
        "per byte, half the bytes a decode step reads)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--attention-backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="paged-attention kernels: auto (triton on CUDA, torch on CPU), torch, or triton "
        "(on CPU only under TRITON_INTERPRET=1: slow, for tests)",
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="run decode steps eagerly, not as CUDA graph replays"
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=128, help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="schedule and send each step while the worker computes the previous one, hiding the "
        "round trip (2-3%% more tok/s at 1-8 streams on a 2-core CPU, even at 32)",
    )
    p.add_argument(
        "--stream-interval",
        type=positive_int,
        default=1,
        help="tokens a stream collects before a message goes out (the first and the last go out at "
        "once); above 1 it saves the CPU a message costs every service on the way",
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: dir name)")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="queued requests beyond which new ones are refused (HTTP 429, gRPC RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--worker-recovery-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for a lost worker before failing the requests it was serving",
    )


def worker_argv(a: argparse.Namespace) -> list[str]:
    """The flags of add_worker_args, back as argv for a child process."""
    argv = [
        "--dtype",
        a.dtype,
        "--block-size",
        str(a.block_size),
        "--device",
        a.device,
        "--gpu-memory-utilization",
        str(a.gpu_memory_utilization),
        "--attention-backend",
        a.attention_backend,
        "--kv-cache-dtype",
        a.kv_cache_dtype,
    ]
    if a.enforce_eager:
        argv.append("--enforce-eager")
    for flag, value in (
        ("--max-model-len", a.max_model_len),
        ("--kv-cache-memory", a.kv_cache_memory),
        ("--num-threads", a.num_threads),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def scheduler_argv(a: argparse.Namespace) -> list[str]:
    argv = [
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--max-num-batched-tokens",
        str(a.max_num_batched_tokens),
        "--enable-prefix-caching" if a.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    argv.append("--async-scheduling" if a.async_scheduling else "--no-async-scheduling")
    argv += ["--stream-interval", str(a.stream_interval)]
    if a.max_model_len is not None:
        argv += ["--max-model-len", str(a.max_model_len)]
    if a.served_model_name:
        argv += ["--served-model-name", a.served_model_name]
    argv += [
        "--max-waiting-requests",
        str(a.max_waiting_requests),
        "--worker-recovery-timeout",
        str(a.worker_recovery_timeout),
    ]
    return argv


def add_observability_args(p: argparse.ArgumentParser, metrics_port: bool = True) -> None:
    """Tracing and metrics flags every service takes; both are off unless given."""
    p.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="OTLP gRPC endpoint for traces, e.g. 127.0.0.1:4317 "
        "(default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else off)",
    )
    if metrics_port:
        p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here")
        p.add_argument("--metrics-host", default="127.0.0.1", help="address of the --metrics-port listener")
