"""C++ kernels for the CPU path (worker/csrc/), compiled once per machine on first use and cached.

- decode_attention.cpp: paged decode attention that reads each sequence's keys and values straight
  from the paged cache through its block-table row. The torch path it replaces gathers every
  context into a padded copy, permutes it per KV head and runs two small batched matmuls: at 32
  sequences of ~150 tokens that was ~20 of a ~58 ms bf16 decode step of SmolLM2-135M.
- layer_ops.cpp: the bf16 decoder layer's small steps in one pass each (residual add + RMSNorm,
  RoPE + KV cache write, SiLU x up), where torch ran 5-10 ops and as many launches for each.
  Together: a 32-sequence decode step 58 -> 37.5 ms, 1 sequence 27 -> 18 ms (2-core Xeon).

The build uses torch's own toolchain helper (a C++ compiler and ninja) and lands under
~/.cache/pagemesh/kernels/, keyed by the sources and their directory, the flags and the CPU (it
is built with -march=native). `python -m worker.cpu_kernels` builds it ahead of time (`make
install` does). Where it cannot be built, the torch path runs and a warning says why;
PAGEMESH_CPU_KERNELS=0 turns the kernels off (for A/B measurements).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build_dir() -> tuple[str, Path]:
    # The source directory too: ninja rebuilds when a build directory's sources move, so two
    # checkouts sharing one cache (a clone for CI beside the working tree) would take turns.
    sources = "".join(f.read_text() for f in sorted(CSRC.glob("*.[ch]*")))
    text = sources + " ".join(CFLAGS) + _cpu_id() + str(CSRC)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return f"pagemesh_cpu_{key}", cache_root / "pagemesh" / "kernels" / key


@cache
def load() -> ModuleType | None:
    """torch.ops.pagemesh (the kernels as torch operators, which torch.profiler names), or None
    where the kernels are off or cannot be built here."""
    if os.environ.get("PAGEMESH_CPU_KERNELS", "1") == "0":
        return None
    name, directory = _build_dir()
    built = any(directory.glob("*.so"))
    try:
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        if not built:
            log.warning("building the CPU kernels once for this machine (about a minute)")
        cpp_extension.load(
            name=name,
            sources=[str(f) for f in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
            is_python_module=False,  # loads the library, whose TORCH_LIBRARY registers torch.ops.pagemesh
        )
        return torch.ops.pagemesh
    except Exception as exc:  # no compiler, no ninja, an odd platform: the torch path still works
        log.warning("CPU kernels unavailable, using the torch path: %s", exc)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    module = load()
    print("CPU kernels:", "ready" if module is not None else "unavailable (torch path)")
    raise SystemExit(0 if module is not None else 1)
