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


def test_every_softserve_variable_is_a_setting() -> None:
    services = compose()["services"]
    for name in ("api", "worker"):
        for variable in services[name]["environment"]:
            assert variable.startswith("SOFTSERVE_")
            assert variable.removeprefix("SOFTSERVE_").lower() in Settings.model_fields, variable


def test_commands_are_cli_commands_and_health_is_ready() -> None:
    services = compose()["services"]
    parser = build_parser()
    for name in ("api", "worker"):
        args = parser.parse_args(services[name]["command"])
        assert callable(args.func)
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    redis_command = services["redis"]["command"]
    assert "--appendonly" in redis_command and "noeviction" in redis_command
    assert services["api"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


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
