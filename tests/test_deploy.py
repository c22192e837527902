"""deploy/: every Kubernetes manifest against the Kubernetes schemas (kubernetes-validate, offline: it bundles them), the
pieces that must agree with each other and with the app, and the compose stack's Prometheus config (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37.0"
# CRDs have no schema in the Kubernetes one: the Prometheus Operator's ServiceMonitor is checked below instead.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
HELM_VALUES = {"prometheus-adapter-values.yaml"}  # a chart's values, not a manifest


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name not in HELM_VALUES:
            found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in manifests() if d["kind"] == kind]
    return doc


def test_every_manifest_passes_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "PersistentVolumeClaim"} <= kinds
    for _file, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_the_validator_catches_a_broken_manifest() -> None:
    import kubernetes_validate

    broken = by_kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["8"]
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_deployment_fits_the_app() -> None:
    from qwen3vl_webui.server.health import build_router

    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    env = {e["name"]: e for e in container["env"]}
    grace = int(env["QWEN3VL_GRACE_SECONDS"]["value"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > grace + pre_stop
    routes = {route.path for route in build_router(object()).routes}  # the app's own probes (server/health.py)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" in routes
    port = container["ports"][0]
    assert port["containerPort"] == int(env["QWEN3VL_PORT"]["value"])
    assert env["QWEN3VL_HOST"]["value"] == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["cache"] == "/home/app/.cache"  # HF_HOME and the compile caches live below it (Dockerfile)
    claim = {v["name"]: v for v in spec["volumes"]}["cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind("PersistentVolumeClaim")["metadata"]["name"]
    from qwen3vl_webui.cli import parse_settings

    assert all(name.startswith("QWEN3VL_") for name in env)
    # every plain value is one the app takes (a bad one would exit 2 here)
    settings_env = {k: v["value"] for k, v in env.items() if "value" in v}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in settings_env.items():
            mp.setenv(k, v)
        settings = parse_settings([])
    assert settings.grace_seconds == grace and settings.gpu_hourly_cost == 0.8


def test_service_hpa_and_monitor_agree() -> None:
    from qwen3vl_webui.server.metrics import exposed_names

    deployment, service = by_kind("Deployment"), by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # gradio's sessions live in one replica
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    key_ref = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}[
        "QWEN3VL_API_KEY"
    ]["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"]["credentials"] == {"name": key_ref["name"], "key": key_ref["key"]}
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = rule["seriesQuery"].split("{")[0].strip("'")
    assert series == "vllm:num_requests_waiting" and series in exposed_names()


def test_the_compose_stack_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"app", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["app:7860"]
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioned["datasources"][0]["uid"] == "prometheus"  # the uid every dashboard panel names
    assert "qwen3vl-dashboard.json" in {p.name for p in (DEPLOY / "grafana").glob("*.json")}


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "needs Debian's prometheus package (apt-get install prometheus; .ci/run does)"
    key = tmp_path / "api_key"
    key.write_text("k")
    config = tmp_path / "prometheus.yml"
    config.write_text((DEPLOY / "prometheus.yml").read_text().replace("/etc/prometheus/api_key", str(key)))
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
