"""Run a snippet in a fresh Python process, for what a process measures about itself from its
start (resident memory) or sets once (oneDNN's cache capacities)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Prepended to every snippet: status("VmRSS:") is the process's resident memory in bytes.
STATUS = """
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
"""


def run_python(script: str, *args: str, drop_env: tuple[str, ...] = ()) -> str:
    """The snippet's stdout; it fails the test, with the snippet's stderr, if the snippet fails."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", STATUS + script, *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
