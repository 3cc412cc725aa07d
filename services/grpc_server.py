"""What every gRPC service shares: server bootstrap with grpc.health.v1 and server reflection."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.telemetry import aio_client_interceptors, server_interceptors

# Long streams and large prompts: raise gRPC's 4 MiB default message cap.
_MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
# Clients ping every 10 s, even on idle streams, so a hung peer is noticed in seconds.
CHANNEL_OPTIONS = [
    *_MESSAGE_LIMITS,
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Servers must accept those pings: by default gRPC allows one every 5 minutes without data and
# answers more with GOAWAY (too_many_pings), which kills long-lived idle streams (the worker's
# step stream between bursts of requests).
SERVER_OPTIONS = [
    *_MESSAGE_LIMITS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass(slots=True)
class Service:
    """One servicer to register: its add_*_to_server function and its full proto name."""

    add_to_server: Callable[[Any, Any], None]
    servicer: Any
    full_name: str  # e.g. pagemesh.v1.Worker


def _register(server: Any, services: Sequence[Service], health_servicer: Any) -> None:
    for s in services:
        s.add_to_server(s.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)


def _mark_serving(health_servicer: Any, services: Sequence[Service]) -> None:
    for name in ["", *(s.full_name for s in services)]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def start_server(addresses: Sequence[str], services: Sequence[Service], max_workers: int = 16) -> grpc.Server:
    """A threaded gRPC server, listening and SERVING when this returns."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        interceptors=server_interceptors(aio=False),  # tracing, when on
    )
    health_servicer = health.HealthServicer()
    _register(server, services, health_servicer)
    for address in addresses:
        server.add_insecure_port(address)
    server.start()
    _mark_serving(health_servicer, services)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server


async def start_aio_server(addresses: Sequence[str], services: Sequence[Service]) -> grpc.aio.Server:
    """An asyncio gRPC server, listening and SERVING when this returns."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors(aio=True))
    health_servicer = health.aio.HealthServicer()
    _register(server, services, health_servicer)
    for address in addresses:
        server.add_insecure_port(address)
    await server.start()
    for name in ["", *(s.full_name for s in services)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Call stop() on SIGTERM or SIGINT (from the main thread, between bytecodes)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def wait_for_termination(server: grpc.Server) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully."""
    done = threading.Event()
    stop_on_signals(done.set)
    done.wait()
    server.stop(grace=2).wait()


def insecure_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def aio_channel(address: str, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    # Tracing's interceptors (when on) carry the caller's trace context in each call's metadata.
    chain = [*interceptors, *aio_client_interceptors()]
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=chain or None)
