"""The local launcher behind `pagemesh serve`: every service in its own process, started in
dependency order, each waited on until healthy, restarted when it dies, all stopped together.

Each child runs in its own process group so that stopping it also stops anything it spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_healthy(address: str, timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def http_healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass(slots=True)
class ServiceProcess:
    name: str
    argv: list[str]  # arguments of `pagemesh`, e.g. ["worker", "--model", ...]
    address: str
    healthy: Callable[[], bool]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagemesh.cli", *self.argv], start_new_session=True, env=env
        )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # whatever the child left behind in its group
        self.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    def __init__(self, stages: list[list[ServiceProcess]], log: Callable[[str], None] = print) -> None:
        self.stages = stages  # each stage starts once the previous one is healthy
        self.services = [s for stage in stages for s in stage]
        self.log = log
        self.stopping = threading.Event()

    def start_all(self, timeout: float = 600.0) -> None:
        for stage in self.stages:
            for s in stage:
                s.start()
            for s in stage:
                self._wait_healthy(s, timeout)

    def _wait_healthy(self, s: ServiceProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not s.healthy():
            if not s.alive():
                code = s.proc.returncode if s.proc else None
                raise RuntimeError(f"{s.name} exited with code {code} before it was healthy")
            if time.monotonic() > deadline or self.stopping.is_set():
                raise RuntimeError(f"{s.name} was not healthy within {timeout:.0f}s")
            time.sleep(0.2)
        self.log(f"launcher: {s.name} is healthy at {s.address} (pid {s.proc.pid if s.proc else '?'})")

    def supervise(self) -> None:
        """Restart any service that dies, until stop() is called."""
        while not self.stopping.wait(0.5):
            for s in self.services:
                if self.stopping.is_set() or s.alive():
                    continue
                code = s.proc.returncode if s.proc else None
                # A service that keeps dying at once backs off instead of spinning.
                if time.monotonic() - s.started_at < 5.0:
                    time.sleep(min(5.0, 0.5 * 2 ** min(s.restarts, 3)))
                s.restarts += 1
                self.log(f"launcher: {s.name} exited with code {code}; restarting (restart #{s.restarts})")
                s.start()
                try:
                    self._wait_healthy(s, timeout=600.0)
                except RuntimeError as e:
                    self.log(f"launcher: {e}")

    def stop(self) -> None:
        self.stopping.set()
        for s in reversed(self.services):
            s.stop()
