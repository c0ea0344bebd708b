"""The compose file and the code do not drift apart: env vars, commands and health endpoints exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from server.cli import build_parser
from server.metrics import ServerMetrics
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


SOFTSERVE_SERVICES = ("api", "worker", "api-cpu", "worker-cpu")


def test_every_softserve_variable_is_a_setting() -> None:
    services = compose()["services"]
    for name in SOFTSERVE_SERVICES:
        for variable in services[name]["environment"]:
            assert variable.startswith("SOFTSERVE_")
            assert variable.removeprefix("SOFTSERVE_").lower() in Settings.model_fields, variable


def test_commands_are_cli_commands_and_health_is_ready() -> None:
    services = compose()["services"]
    parser = build_parser()
    for name in SOFTSERVE_SERVICES:
        args = parser.parse_args(services[name]["command"])
        assert callable(args.func)
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    redis_command = services["redis"]["command"]
    assert "--appendonly" in redis_command and "noeviction" in redis_command
    assert services["api"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_each_profile_builds_its_own_image_and_only_gpu_reserves_a_gpu() -> None:
    """The GPU services build with the CUDA wheels and reserve a GPU; the CPU ones build with the CPU wheels,
    reserve nothing and answer to the same names, so Prometheus and clients find either profile's."""
    services = compose()["services"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=" in dockerfile  # the build argument each profile sets
    for suffix, profile in (("", "gpu"), ("-cpu", "cpu")):
        for name in ("api", "worker"):
            service = services[name + suffix]
            assert service["profiles"] == [profile] and service["image"] == f"softserve:{profile}"
            index = service["build"]["args"]["TORCH_INDEX"]
            devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            if profile == "gpu":
                assert "/whl/cu" in index and devices[0]["capabilities"] == ["gpu"]
            else:
                assert index.endswith("/whl/cpu") and devices == []
                assert service["environment"]["SOFTSERVE_DEVICE"] == "cpu"
                assert service["networks"]["default"]["aliases"] == [name]
    assert all("profiles" not in services[name] for name in ("redis", "prometheus", "grafana"))


def test_prometheus_scrapes_the_api_and_the_worker() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    port = compose()["services"]["worker"]["environment"]["SOFTSERVE_WORKER_METRICS_PORT"]
    assert targets == ["api:8000", f"worker:{port}"]


def exported_sample_names() -> set[str]:
    """Every sample name the server's metrics can export (counters add `_total`, histograms three more)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    families = list(ServerMetrics().registry.collect())
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "softserve.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"softserve_[a-z_]+", expr)}
    assert len(used) >= 12
    assert used <= exported_sample_names(), used - exported_sample_names()
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("requests", "latency", "batch", "tasks per batch", "queue", "cache hit", "rejections", "training"):
        assert topic in titles, topic


def test_grafana_is_provisioned_with_prometheus() -> None:
    services = compose()["services"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "provisioning" in mounts and "dashboards" in mounts
    datasource = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
