"""`pagemesh gateway`: serve the OpenAI REST API in front of a scheduler."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn

from gateway.app import create_app
from services.args import add_observability_args
from services.telemetry import setup_tracing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagemesh gateway", description="OpenAI-compatible HTTP gateway")
    # vLLM listens on 0.0.0.0; we default to loopback so a dev machine never exposes an unauthenticated
    # model server by accident. Pass --host 0.0.0.0 in containers.
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--scheduler",
        default="127.0.0.1:50051",
        help="address of the scheduler's pagemesh.v1.Inference API (host:port or unix:///path)",
    )
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: the scheduler's)"
    )
    add_observability_args(p, metrics_port=False)  # /metrics is on --port
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


async def _serve(server: uvicorn.Server, url: str) -> bool:
    """Run uvicorn; announce the URL once the socket is actually listening (launchers wait for it)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"gateway: serving on {url}", flush=True)
    await task
    return server.started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tracing("pagemesh-gateway", args.otlp_traces_endpoint)  # before the app makes its channel
    app = create_app(args.scheduler, api_key=args.api_key, served_model_name=args.served_model_name)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    started = asyncio.run(_serve(uvicorn.Server(config), f"http://{args.host}:{args.port}"))
    return 0 if started else 1


if __name__ == "__main__":
    sys.exit(main())
