"""`deploy/kubernetes/`: each overlay renders with `kubectl kustomize`, every object validates against the
Kubernetes schemas or its CRD's, and what the manifests say of softserve matches the code. Planted errors in a
copy show that the checks can fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.kubernetes import by_kind, crd_schemas, problems, render

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_and_validates(overlay: str) -> None:
    assert problems(DEPLOY, overlay, ROOT) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_holds_every_object_of_the_topology(overlay: str) -> None:
    objects = render(DEPLOY / "overlays" / overlay)
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    assert {
        ("Deployment", "softserve-api"),
        ("Deployment", "softserve-worker"),
        ("Deployment", "softserve-endpoint-picker"),
        ("StatefulSet", "redis"),
        ("Service", "softserve-api"),
        ("Service", "redis"),
        ("ServiceMonitor", "softserve"),
        ("ScaledObject", "softserve-api"),
        ("InferencePool", "softserve"),
    } <= kinds
    api = by_kind(objects, "Deployment")["softserve-api"]["spec"]["template"]["spec"]["containers"][0]
    gpus = api["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) == (overlay == "gpu") and api["image"] == f"softserve:{overlay}"
    redis = by_kind(objects, "StatefulSet")["redis"]["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    trigger = by_kind(objects, "ScaledObject")["softserve-api"]["spec"]["triggers"][0]
    assert "softserve_engine_waiting_rows" in trigger["metadata"]["query"]


def test_every_vendored_crd_has_its_licence() -> None:
    schemas = crd_schemas(DEPLOY / "crds")
    assert {kind for _, kind in schemas} == {"ScaledObject", "ServiceMonitor", "InferencePool"}
    folders = [path for path in (DEPLOY / "crds").iterdir() if path.is_dir()]
    assert len(folders) == 3
    for folder in folders:
        assert "Apache License" in (folder / "LICENSE").read_text()


def planted(tmp_path: Path, relative: str, old: str, new: str) -> Path:
    """A copy of `deploy/kubernetes` with one edit in one file."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy)
    path = copy / relative
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return copy


@pytest.mark.parametrize(
    ("relative", "old", "new", "expected"),
    [
        # A misspelt field of a built-in kind: strict Kubernetes validation.
        ("base/api.yaml", "          readinessProbe:", "          readynessProbe:", "readynessProbe"),
        # A port the server does not listen on (SOFTSERVE_PORT is 8000).
        ("base/api.yaml", "              containerPort: 8000", "              containerPort: 8080", "listens on 8000"),
        # The InferencePool sending to a port no API container has.
        ("base/inference-pool.yaml", "    - number: 8000", "    - number: 8001", "port 8001 is no API port"),
        # A misspelt field of a custom resource: the vendored CRD's schema.
        ("base/autoscaling.yaml", "  maxReplicaCount: 8", "  maxReplicas: 8", "maxReplicas"),
        (
            "base/monitoring.yaml",
            "      interval: 5s\n    - port: metrics",
            "      intervall: 5s\n    - port: metrics",
            "intervall",
        ),
        # A wrong type in a custom resource.
        ("base/inference-pool.yaml", "      number: 9002", "      number: grpc", "'grpc' is not of type 'integer'"),
        # A probe on a route the server does not have.
        ("base/api.yaml", "              path: /ready", "              path: /readyz", "/readyz"),
        # An env var that is no setting.
        (
            "base/kustomization.yaml",
            "SOFTSERVE_STORE=redis",
            "SOFTSERVE_STORAGE=redis",
            "SOFTSERVE_STORAGE is not a setting",
        ),
        # A grace period shorter than the drain.
        ("base/api.yaml", "terminationGracePeriodSeconds: 90", "terminationGracePeriodSeconds: 30", "<= preStop"),
        # A command the CLI does not have.
        ("base/worker.yaml", 'args: ["worker"]', 'args: ["train-worker"]', "is not a softserve command"),
        # A metric name the server does not export, given to the endpoint picker.
        (
            "base/endpoint-picker.yaml",
            "kvUsageSpec: softserve_engine_cache_usage_ratio",
            "kvUsageSpec: vllm:kv_cache_usage_perc",
            "kvUsageSpec 'vllm:kv_cache_usage_perc' is not a metric",
        ),
        # A secret nothing in softserve reads.
        ("base/api.yaml", "secretName: softserve-api-keys", "secretName: api-keys", "secret api-keys"),
        # An image tag docker-compose.yml does not build.
        ("overlays/gpu/kustomization.yaml", "newTag: gpu", "newTag: cuda", "image tag 'cuda'"),
    ],
)
def test_a_planted_error_is_found(tmp_path: Path, relative: str, old: str, new: str, expected: str) -> None:
    found = problems(planted(tmp_path, relative, old, new), "gpu", ROOT)
    assert any(expected in problem for problem in found), found


def test_a_stale_dashboard_copy_is_found(tmp_path: Path) -> None:
    copy = planted(tmp_path, "base/grafana-dashboard.json", '"panels"', '"panels_"')
    assert any("Grafana dashboard" in problem for problem in problems(copy, "cpu", ROOT))


def test_the_compose_and_kubernetes_env_agree_on_the_shared_settings() -> None:
    """The same store, Redis and data directory in both deployments (only the host names differ)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    maps = by_kind(render(DEPLOY / "overlays" / "cpu"), "ConfigMap")
    env = next(m["data"] for name, m in maps.items() if name.startswith("softserve-env"))
    for variable in ("SOFTSERVE_STORE", "SOFTSERVE_DATA_DIR", "SOFTSERVE_REDIS_URL"):
        assert env[variable] == compose[variable], variable
