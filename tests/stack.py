"""Start and stop the real service stack (`pagemesh serve`) for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from protos.pagemesh.v1 import inference_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    proc: subprocess.Popen
    http_url: str
    grpc_address: str
    model_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 120.0, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log()[after:]:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pagemesh serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in the log after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.2)


def start_stack(model_dir: Path, log_path: Path, *extra: str, timeout: float = 300.0) -> Stack:
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "pagemesh.cli",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        *extra,
    ]
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    stack = Stack(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", model_dir, log_path)
    try:
        stack.wait_for_log("pagemesh: ready", timeout=timeout)
    except Exception:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack, timeout: float = 30.0) -> int:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()
    return stack.proc.returncode


def descendants(pid: int) -> list[int]:
    """Every live process whose ancestry leads to pid (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents[int(entry.name)] = ppid
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def wait_until_idle(stub, timeout: float = 10.0) -> inference_pb2.EngineStats:
    """The scheduler's stats once nothing runs or waits and every KV block is free (or the last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetStats(inference_pb2.GetStatsRequest())
        idle = s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks
        if idle or time.monotonic() > deadline:
            return s
        time.sleep(0.05)
