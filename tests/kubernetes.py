"""Checking `deploy/kubernetes/` without a cluster: render an overlay with `kubectl kustomize`, validate every
object against the Kubernetes schemas (`kubernetes-validate`) or its CRD's own (vendored under `crds/`), and
check what the manifests say of softserve against the code: the settings, the CLI, the ports, the probes, the
metrics. `problems` returns every finding as one line; an empty list is a pass."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from pydantic import TypeAdapter

from server.cli import build_parser
from server.metrics import TASK_INFO_LABELS, ServerMetrics, TaskNames
from server.settings import Settings

Manifest = dict[str, Any]
# The oldest release that runs these manifests as written: `preStop.sleep` is on by default from 1.30 (a
# schema cannot tell a feature gate; 1.29 has the field, off).
KUBERNETES_VERSION = "1.30.0"
PROBE_PATHS = {"/health", "/ready"}  # server/api/operations.py
SOFTSERVE_IMAGE = "softserve"  # docker-compose.yml builds softserve:cpu and softserve:gpu


def kubectl() -> str:
    """`kubectl` from PATH or beside this Python (`make redis` installs it)."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("kubectl is not installed: `make redis` installs it")
    return found


def render(overlay: Path) -> list[Manifest]:
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strict(schema: Any) -> Any:
    """The CRD's schema as the API server applies it with strict field validation: an object that lists its
    properties takes no others (unless it says it keeps unknown fields)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def crd_schemas(crds: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict schema of each served version of each vendored CRD."""
    schemas: dict[tuple[str, str], dict] = {}
    for path in sorted(crds.rglob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def schema_problems(objects: list[Manifest], crds: Path) -> Iterator[str]:
    schemas = crd_schemas(crds)
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        schema = schemas.get((obj.get("apiVersion"), obj.get("kind")))
        if schema is not None:
            for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
                yield f"{name}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            yield f"{name}: no schema (neither Kubernetes' nor a vendored CRD's)"
        except kubernetes_validate.ValidationError as error:
            yield f"{name}: {'.'.join(map(str, error.path))}: {error.message}"


def by_kind(objects: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def container_env(container: Manifest, objects: list[Manifest]) -> dict[str, str]:
    """Every variable a container gets: its ConfigMaps' (envFrom) and its own `env`, which win."""
    env: dict[str, str] = {}
    maps = by_kind(objects, "ConfigMap")
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]].get("data", {}))
    env.update({item["name"]: item.get("value", "") for item in container.get("env", [])})
    return env


def setting(env: dict[str, str], name: str) -> Any:
    """A setting's value as the server would read it from `env` (its default when unset)."""
    field = Settings.model_fields[name]
    variable = f"SOFTSERVE_{name.upper()}"
    return TypeAdapter(field.annotation).validate_python(env[variable]) if variable in env else field.default


def softserve_problems(objects: list[Manifest], compose_tags: set[str]) -> Iterator[str]:
    parser = build_parser()
    secrets = {"softserve-api-keys", "softserve-engine-keys"}  # made by hand (README); nothing else is expected
    api_ports: set[int] = set()
    for workload in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "StatefulSet").values()]:
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" in volume and volume["secret"]["secretName"] not in secrets:
                yield f"{workload['metadata']['name']}: secret {volume['secret']['secretName']} is not one softserve uses"
        for container in pod["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            image, _, tag = container["image"].partition(":")
            if image != SOFTSERVE_IMAGE:
                continue
            if tag not in compose_tags:
                yield f"{where}: image tag {tag!r} is not built by docker-compose.yml ({sorted(compose_tags)})"
            try:
                parser.parse_args(container.get("args", []))
            except SystemExit:
                yield f"{where}: {container.get('args')} is not a softserve command"
                continue
            env = container_env(container, objects)
            for variable in env:
                if variable.removeprefix("SOFTSERVE_").lower() not in Settings.model_fields:
                    yield f"{where}: {variable} is not a setting"
            yield from port_problems(where, container, env, api_ports)
            if container.get("args") == ["serve"]:
                yield from drain_problems(where, pod, container, env)
    yield from pool_problems(objects, api_ports)


def port_problems(where: str, container: Manifest, env: dict[str, str], api_ports: set[int]) -> Iterator[str]:
    """The ports declared are the ones the process listens on, and the probes ask those for real routes."""
    command = container["args"][0]
    listens = {"serve": setting(env, "port"), "worker": setting(env, "worker_metrics_port")}.get(command)
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    if listens is not None and set(ports.values()) != {listens}:
        yield f"{where}: declares ports {sorted(ports.values())} but `softserve {command}` listens on {listens}"
    if command == "serve":
        api_ports.update(ports.values())
        if setting(env, "host") != "0.0.0.0":
            yield f"{where}: SOFTSERVE_HOST must be 0.0.0.0 for the kubelet and the Service to reach it"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind, {}).get("httpGet")
        if probe is None:
            if command == "serve":
                yield f"{where}: no HTTP {kind}"
            continue
        if probe["path"] not in PROBE_PATHS:
            yield f"{where}: {kind} asks {probe['path']}, which is none of {sorted(PROBE_PATHS)}"
        if probe["port"] not in ports and probe["port"] not in ports.values():
            yield f"{where}: {kind} asks port {probe['port']}, which the container does not declare"
    if command == "serve" and container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
        yield f"{where}: readiness must be /ready (it turns 503 while draining and while the engine is down)"


def drain_problems(where: str, pod: Manifest, container: Manifest, env: dict[str, str]) -> Iterator[str]:
    """SIGTERM comes after preStop; the server then drains for `drain_delay_s` + `drain_timeout_s`, all of it
    inside the grace period (else the kubelet kills requests the server would have finished)."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pre_stop + setting(env, "drain_delay_s") + setting(env, "drain_timeout_s")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= needed:
        yield f"{where}: terminationGracePeriodSeconds {grace} <= preStop + drain delay + drain timeout ({needed})"


def pool_problems(objects: list[Manifest], api_ports: set[int]) -> Iterator[str]:
    services = by_kind(objects, "Service")
    for pool in by_kind(objects, "InferencePool").values():
        for port in pool["spec"]["targetPorts"]:
            if port["number"] not in api_ports:
                yield f"InferencePool/{pool['metadata']['name']}: port {port['number']} is no API port {api_ports}"
        picker = pool["spec"]["endpointPickerRef"]
        service = services.get(picker["name"])
        if service is None or picker["port"]["number"] not in {p["port"] for p in service["spec"]["ports"]}:
            yield f"InferencePool/{pool['metadata']['name']}: no Service {picker['name']}:{picker['port']['number']}"
    for monitor in by_kind(objects, "ServiceMonitor").values():
        selected = [
            s
            for s in services.values()
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
        ]
        named = {port["name"] for service in selected for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in named:
                yield f"ServiceMonitor/{monitor['metadata']['name']}: no selected Service has a port {endpoint['port']}"


def exported_metrics() -> dict[str, list[str]]:
    """The name of every metric family the API exports, with its label names (the tasks' info series as the
    engine client first publishes it)."""
    metrics = ServerMetrics()
    metrics.engine.tasks_info.source = lambda: TaskNames((), (), max_tasks=1, changed_at=0.0)
    return {
        family.name: sorted({label for sample in family.samples for label in sample.labels})
        for family in metrics.registry.collect()
    }


def picker_problems(objects: list[Manifest]) -> Iterator[str]:
    """The endpoint picker's engine mapping names metrics the server exports, the info one with the protocol's
    label names, and the API pods carry the label that selects the mapping."""
    maps = by_kind(objects, "ConfigMap")
    picker = by_kind(objects, "Deployment")["softserve-endpoint-picker"]["spec"]["template"]["spec"]
    (source,) = [volume["configMap"]["name"] for volume in picker["volumes"] if "configMap" in volume]
    config = yaml.safe_load(maps[source]["data"]["endpoint-picker.yaml"])
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    exported = exported_metrics()
    api = by_kind(objects, "Deployment")["softserve-api"]
    engine = api["spec"]["template"]["metadata"]["labels"].get("inference.networking.k8s.io/engine-type")
    if engine != extractor["defaultEngine"]:
        yield f"the API pods' engine-type label {engine!r} is not the picker's engine {extractor['defaultEngine']!r}"
    for mapping in extractor["engineConfigs"]:
        for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
            name = mapping.get(key, "")
            if name not in exported:
                yield f"endpoint picker: {key} {name!r} is not a metric the server exports"
        lora = mapping.get("loraSpec", "")
        if lora in exported and exported[lora] != sorted(TASK_INFO_LABELS):
            yield f"endpoint picker: {lora} has labels {exported[lora]}, not the protocol's {list(TASK_INFO_LABELS)}"


def dashboard_problems(objects: list[Manifest], dashboard: Path) -> Iterator[str]:
    maps = [m for m in objects if m["kind"] == "ConfigMap" and "softserve.json" in m.get("data", {})]
    if len(maps) != 1 or json.loads(maps[0]["data"]["softserve.json"]) != json.loads(dashboard.read_text()):
        yield f"the Grafana dashboard ConfigMap is not {dashboard}: copy it to deploy/kubernetes/base/"


def problems(root: Path, overlay: str, repo: Path) -> list[str]:
    """Every problem of `root/overlays/<overlay>` (`root` is a `deploy/kubernetes` folder, `repo` the project)."""
    objects = render(root / "overlays" / overlay)
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    tags = {s["image"].partition(":")[2] for s in compose["services"].values() if "build" in s and "image" in s}
    return [
        *schema_problems(objects, root / "crds"),
        *softserve_problems(objects, tags),
        *picker_problems(objects),
        *dashboard_problems(objects, repo / "docker" / "grafana" / "dashboards" / "softserve.json"),
    ]
