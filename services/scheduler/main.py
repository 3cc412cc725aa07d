"""`pagemesh scheduler`: the engine core process, serving the public Inference API."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from services.args import add_observability_args, add_scheduler_args

if TYPE_CHECKING:
    from services.scheduler.observability import Readiness


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pagemesh scheduler", description="Serve pagemesh.v1.Inference over gRPC."
    )
    p.add_argument("--model", required=True, help="the model directory the worker serves (for names)")
    p.add_argument(
        "--address",
        action="append",
        default=None,
        help="where to serve, host:port or unix:///path.sock; repeatable (default 127.0.0.1:50051)",
    )
    p.add_argument("--worker", required=True, help="the worker's address")
    p.add_argument("--tokenizer", required=True, help="the tokenizer service's address")
    p.add_argument("--max-model-len", type=int, default=None)
    add_scheduler_args(p)
    add_observability_args(p)
    p.add_argument(
        "--ready-stall-seconds",
        type=float,
        default=5.0,
        help="a worker step running longer than this makes the scheduler not ready (a wedged worker)",
    )
    a = p.parse_args(argv)
    asyncio.run(serve(a))
    return 0


async def serve(a: argparse.Namespace) -> None:
    from protos.pagemesh.v1 import inference_pb2_grpc
    from services.grpc_server import Service, start_aio_server
    from services.metrics import new_registry, serve_metrics
    from services.scheduler.engine_loop import EngineLoop
    from services.scheduler.observability import Readiness
    from services.scheduler.scheduler import SchedulerConfig
    from services.scheduler.service import InferenceServicer
    from services.telemetry import setup_tracing
    from tokenizer_svc.client import TokenizerClient

    setup_tracing("pagemesh-scheduler", a.otlp_traces_endpoint)  # before any channel or server exists
    addresses = a.address or ["127.0.0.1:50051"]
    name = a.served_model_name or Path(a.model).name
    tokenizer = TokenizerClient(a.tokenizer)
    servicer = InferenceServicer(tokenizer, name, a.model)
    config = SchedulerConfig(
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        enable_prefix_caching=a.enable_prefix_caching,
        async_scheduling=a.async_scheduling,
    )
    print(f"scheduler: connecting to the worker at {a.worker} ...", flush=True)
    servicer.max_waiting_requests = a.max_waiting_requests
    servicer.stream_interval = a.stream_interval
    engine_loop = await asyncio.to_thread(
        EngineLoop, a.worker, config, servicer.publish, servicer.on_failure, a.worker_recovery_timeout
    )
    servicer.engine_loop = engine_loop
    servicer.readiness = Readiness(engine_loop, stall_after=a.ready_stall_seconds)
    servicer.observer.metrics.watch(engine_loop)
    port_registry = new_registry()  # the engine's metrics and this process's
    port_registry.register(servicer.observer.metrics.registry)
    serve_metrics(port_registry, a.metrics_port, a.metrics_host)
    engine_loop.start()
    detok = asyncio.create_task(servicer.detokenize_forever())
    servicer.readiness.watch_task("the detokenization pipeline", detok)
    server = await start_aio_server(
        addresses,
        [Service(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, "pagemesh.v1.Inference")],
    )
    cap = engine_loop.engine.capacity
    print(
        f"scheduler: serving {name} on {', '.join(addresses)} ({cap.num_blocks} blocks x {cap.block_size}, "
        f"max_model_len {engine_loop.engine.max_model_len})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    drain = DrainToggle(server.health_servicer, servicer.readiness)
    truthful = asyncio.create_task(
        servicer.readiness.keep_health_truthful(server.health_servicer, "pagemesh.v1.Inference")
    )
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(drain.toggle()))
    await stop.wait()
    await server.stop(grace=2)
    engine_loop.close()
    detok.cancel()
    truthful.cancel()


class DrainToggle:
    """SIGUSR1 drains this replica: pagemesh.v1.Inference turns NOT_SERVING, so Envoy's health checks
    and readiness probes stop sending work while requests in flight finish; SIGUSR1 again undrains.
    The overall ("") status stays SERVING: liveness asks for that, and the process is alive."""

    def __init__(self, health_servicer, readiness: Readiness) -> None:  # noqa: ANN001 - grpc_health's aio servicer
        self.health = health_servicer
        self.readiness = readiness  # keeps the status it mirrors into health in step with the drain
        self.serving = True

    async def toggle(self) -> None:
        from grpc_health.v1 import health_pb2

        self.serving = not self.serving
        self.readiness.draining = not self.serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("pagemesh.v1.Inference", status)
        print(
            f"scheduler: pagemesh.v1.Inference {'SERVING' if self.serving else 'NOT_SERVING'} (SIGUSR1)",
            flush=True,
        )
