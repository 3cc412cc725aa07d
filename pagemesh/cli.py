"""The `pagemesh` command: `serve` starts everything; one subcommand per service runs just that one."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

SERVICES = ("worker", "scheduler", "tokenizer", "gateway")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        return run_service(argv[0], argv[1:])
    if argv and argv[0] == "deploy":
        from deploy.envoy.cli import main as deploy_main

        return deploy_main(argv[1:])
    if argv[:2] == ["bench", "throughput"]:
        from pagemesh.bench.throughput import main as throughput_main

        return throughput_main(argv[2:])
    if argv[:2] == ["bench", "serve"]:
        from pagemesh.bench.serve import main as serve_bench_main

        return serve_bench_main(argv[2:])
    p = argparse.ArgumentParser(prog="pagemesh", description="LLM serving as microservices.")
    sub = p.add_subparsers(dest="command", required=True)
    serve_parser(
        sub.add_parser("serve", help="start all services: the OpenAI API on --port, gRPC on --grpc-port")
    )
    sub.add_parser("model", help="provision the default model and print its path")
    sub.add_parser("deploy", help="deployment files (see `pagemesh deploy envoy-config -h`)")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench.add_parser(
        "throughput", help="offline LLM.generate throughput (see `pagemesh bench throughput -h`)"
    )
    bench.add_parser(
        "serve", help="online serving benchmark of an OpenAI endpoint (see `pagemesh bench serve -h`)"
    )
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service alone (see `pagemesh {name} -h`)")
    a = p.parse_args(argv)
    if a.command == "model":
        from pagemesh.model_store import ensure_default_model

        print(ensure_default_model())
        return 0
    return serve(a)


def run_service(name: str, argv: list[str]) -> int:
    if name == "worker":
        from worker.main import main as worker_main

        return worker_main(argv)
    if name == "scheduler":
        from services.scheduler.main import main as scheduler_main

        return scheduler_main(argv)
    if name == "tokenizer":
        from tokenizer_svc.main import main as tokenizer_main

        return tokenizer_main(argv)
    from gateway.main import main as gateway_main

    return gateway_main(argv)


def serve_parser(p: argparse.ArgumentParser) -> None:
    from services.args import add_scheduler_args, add_worker_args

    p.add_argument(
        "model", nargs="?", default=None, help="local Hugging Face model directory (default: SmolLM2-135M)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address of the HTTP and public gRPC listeners")
    p.add_argument("--port", type=int, default=8000, help="OpenAI-compatible HTTP API")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC API (pagemesh.v1.Inference)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory if not the model's")
    p.add_argument(
        "--otlp-traces-endpoint", default=None, help="OTLP gRPC endpoint for traces (off by default)"
    )
    add_worker_args(p)
    add_scheduler_args(p)


def serve(a: argparse.Namespace) -> int:
    from services.args import scheduler_argv, worker_argv
    from services.launcher import Launcher, ServiceProcess, grpc_healthy, http_healthy

    if a.model is None:
        from pagemesh.model_store import ensure_default_model

        a.model = str(ensure_default_model())
    model = str(Path(a.model).expanduser().resolve())
    if not (Path(model) / "config.json").is_file():
        print(
            f"pagemesh: {a.model!r} is not a Hugging Face model directory (no config.json)", file=sys.stderr
        )
        return 2
    run_dir = tempfile.mkdtemp(prefix="pagemesh-")
    tokenizer_addr = f"unix://{run_dir}/tokenizer.sock"
    worker_addr = f"unix://{run_dir}/worker.sock"
    scheduler_addr = f"unix://{run_dir}/scheduler.sock"
    public_grpc = f"{a.host}:{a.grpc_port}"
    http = f"http://{a.host}:{a.port}"

    tokenizer = ServiceProcess(
        "tokenizer",
        ["tokenizer", "--model", a.tokenizer or model, "--address", tokenizer_addr],
        tokenizer_addr,
        lambda: grpc_healthy(tokenizer_addr),
    )
    worker = ServiceProcess(
        "worker",
        ["worker", "--model", model, "--address", worker_addr, *worker_argv(a)],
        worker_addr,
        lambda: grpc_healthy(worker_addr),
    )
    scheduler = ServiceProcess(
        "scheduler",
        [
            "scheduler",
            "--model",
            model,
            "--address",
            scheduler_addr,
            "--address",
            public_grpc,
            "--worker",
            worker_addr,
            "--tokenizer",
            tokenizer_addr,
            *scheduler_argv(a),
        ],
        scheduler_addr,
        lambda: grpc_healthy(scheduler_addr),
    )
    gateway_argv = ["gateway", "--host", a.host, "--port", str(a.port), "--scheduler", scheduler_addr]
    if a.api_key:
        gateway_argv += ["--api-key", a.api_key]
    if a.served_model_name:
        gateway_argv += ["--served-model-name", a.served_model_name]
    gateway = ServiceProcess("gateway", gateway_argv, http, lambda: http_healthy(f"{http}/health"))
    if a.otlp_traces_endpoint:
        for s in (tokenizer, worker, scheduler, gateway):
            s.env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = a.otlp_traces_endpoint

    launcher = Launcher([[tokenizer, worker], [scheduler], [gateway]])
    stop = lambda *_: launcher.stopping.set()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"pagemesh: starting services for {model} (sockets in {run_dir})", flush=True)
        launcher.start_all()
        name = a.served_model_name or Path(model).name
        print(
            f"pagemesh: ready. OpenAI API: {http}/v1 (model {name!r}); "
            f"gRPC pagemesh.v1.Inference: {public_grpc}",
            flush=True,
        )
        launcher.supervise()
    except RuntimeError as e:
        print(f"pagemesh: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("pagemesh: stopping all services", flush=True)
        launcher.stop()
        for sock in Path(run_dir).glob("*.sock"):
            sock.unlink(missing_ok=True)
        Path(run_dir).rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
