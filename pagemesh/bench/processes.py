"""The server processes a benchmark starts, waits for and measures: ports, readiness, stopping
a process group, and each process's peak memory and CPU time from Linux's /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reset_peak_rss(pids: dict[str, int]) -> bool:
    """Start each process's VmHWM over from its current RSS (Linux: `5` to clear_refs), so that the
    peak read after a run belongs to that run rather than to model loading."""
    done = True
    for pid in pids.values():
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


def peak_rss_mib(pids: dict[str, int]) -> dict[str, float]:
    peaks = {}
    for name, pid in pids.items():
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[name] = int(line.split()[1]) / 1024
    return peaks


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (/proc/PID/stat), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass(slots=True)
class CpuMeter:
    """CPU-seconds the server's processes and this one (the benchmark client) spend between
    start() and stop()."""

    pids: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)

    def read(self) -> dict[str, float]:
        now = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        return {name: s for name, s in now.items() if s is not None} | {"client": time.process_time()}

    def start(self) -> None:
        self.started = self.read()

    def stop(self) -> None:
        now = self.read()
        self.seconds = {name: now[name] - s for name, s in self.started.items() if name in now}


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM its process group (pagemesh serve stops its services on it), then SIGKILL."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            state = (
                f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout}s"
            )
            raise RuntimeError(f"{what} {state}:\n{tail}")
        time.sleep(0.5)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False
