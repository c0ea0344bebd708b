"""The compose file and the code do not drift apart: env vars, commands and health endpoints exist."""

from __future__ import annotations

from pathlib import Path

import yaml

from server.cli import build_parser
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
