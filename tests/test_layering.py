"""The import graph has no upward arrow: each layer imports only what lies below it.

From the bottom: `prompt_store` (its own package); the domain packages of `server` (serving, engine, registry,
tenancy, jobs, training) with the modules every layer shares (errors, metrics, strict_json); then the HTTP
layer (`server.api`); then the composition roots (components, backend, worker, app, cli, and the engine
process's entry point and link), the only
modules that read `Settings`; above them all, the harness the tests and benchmarks share (`server.testing`),
which nothing of the server imports. Imports are read with `ast` from the source, including those inside functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = ("server.serving", "server.engine", "server.registry", "server.tenancy", "server.jobs", "server.training")
HTTP = ("server.api", "fastapi", "starlette", "uvicorn")
# The engine process's entry point and the link that starts it build components from the settings too.
ROOTS = (
    "server.components",
    "server.backend",
    "server.worker",
    "server.app",
    "server.cli",
    "server.engine.process",
    "server.engine.process_link",
)
# Above the roots: the harness the tests and benchmarks share (servers on free ports, checkpoints); it builds apps
# from settings, and nothing of the server imports it.
HARNESS = "server.testing"
READ_SETTINGS = {*ROOTS, "server.settings", f"{HARNESS}.processes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> Iterator[str]:
    """Every module an import names: `from a.b import c` names `a.b` and `a.b.c` (c may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative imports hide the layer they reach"
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    files = [*ROOT.glob("server/**/*.py"), *ROOT.glob("prompt_store/**/*.py")]
    return {module_name(path): set(imported(ast.parse(path.read_text(), str(path)))) for path in files}


def within(module: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def arrows(importer_in: tuple[str, ...], imported_in: tuple[str, ...] | set[str]) -> list[str]:
    return sorted(
        f"{importer} -> {target}"
        for importer, targets in import_graph().items()
        if within(importer, importer_in)
        for target in targets
        if within(target, imported_in)
    )


def test_the_graph_is_read() -> None:
    """The reader sees imports at module level and inside functions: a layering test that saw nothing would pass."""
    graph = import_graph()
    assert "fastapi" in graph["server.api.inference"]
    assert "server.settings.Settings" in graph["server.components"]
    assert "server.worker" in graph["server.cli"]  # imported inside a function
    assert len(graph) > 50


def test_prompt_store_imports_nothing_from_server() -> None:
    assert arrows(("prompt_store",), ("server",)) == []


@pytest.mark.parametrize("package", DOMAIN)
def test_domain_packages_know_no_http(package: str) -> None:
    assert arrows((package,), HTTP) == []


@pytest.mark.parametrize("package", [*DOMAIN, "server.api", "prompt_store"])
def test_nothing_below_imports_a_composition_root(package: str) -> None:
    """Only the roots build components; the API reaches them through `app.state` (typed by `server.components`)."""
    allowed = {"server.components"} if package == "server.api" else set()
    importers_below = [
        a for a in arrows((package,), tuple(set(ROOTS) - allowed)) if not within(a.split(" -> ")[0], ROOTS)
    ]
    assert importers_below == []


def test_only_the_composition_roots_read_the_settings() -> None:
    readers = {importer.split(" -> ")[0] for importer in arrows(("server", "prompt_store"), ("server.settings",))}
    assert "server.components" in readers
    assert readers <= READ_SETTINGS, sorted(readers - READ_SETTINGS)


def test_the_server_never_imports_its_test_harness() -> None:
    importers = [
        a for a in arrows(("server", "prompt_store"), (HARNESS,)) if not within(a.split(" -> ")[0], (HARNESS,))
    ]
    assert importers == []


def test_training_knows_neither_jobs_nor_redis() -> None:
    """The recipe and the trainer run anywhere: no queue, no store, no HTTP."""
    assert arrows(("server.training",), ("server.jobs", "server.registry", "redis", "rq", *HTTP)) == []


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles among the project's own modules (strongly connected parts of more than one module), each
    sorted; imports under `TYPE_CHECKING` and inside functions count: a circle is a design knot even when Python
    lets it run."""
    edges = {module: sorted(t for t in targets if t in graph and t != module) for module, targets in graph.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in edges[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            part = [stack.pop()]
            while part[-1] != module:
                part.append(stack.pop())
            if len(part) > 1:
                circles.append(sorted(part))

    for module in sorted(edges):
        if module not in order:
            visit(module)
    return circles


def test_no_module_imports_itself_through_others() -> None:
    assert import_circles(import_graph()) == []


def test_a_planted_circle_is_found() -> None:
    graph = import_graph()
    graph["server.errors"] = {*graph["server.errors"], "server.serving.service"}  # service imports errors
    assert any({"server.errors", "server.serving.service"} <= set(circle) for circle in import_circles(graph))
