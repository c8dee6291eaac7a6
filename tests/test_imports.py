"""The architecture's boundaries, checked on the source: who may import whom (ARCHITECTURE.md, Boundaries).

Every import counts, at module level or inside a function (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "styleray"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names this file imports (``from a.b import c``: a.b.c when that is a module, else a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; styleray imports absolutely"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return found


GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}
EXTERNAL = {name: _imports(path) for name, path in MODULES.items()}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_sees_the_package():
    assert {"styleray.cli", "styleray.settings", "styleray.storage", "styleray.models.networks",
            "styleray.platform.train.ray_train", "styleray.serve.app"} <= set(MODULES)
    assert "styleray.settings" in GRAPH["styleray.cli"]


def test_nothing_imports_the_cli():
    offenders = sorted(name for name, deps in GRAPH.items() if "styleray.cli" in deps)
    assert not offenders, f"these modules import styleray.cli: {offenders}"


def test_models_import_neither_ray_nor_other_parts():
    for name, deps in EXTERNAL.items():
        if not _under(name, "styleray.models"):
            continue
        assert not any(_under(d, "ray") for d in deps), f"{name} imports Ray"
        inside = {d for d in deps if _under(d, "styleray")}
        assert all(_under(d, "styleray.models") or d in ("styleray", "styleray.config") for d in inside), \
            f"{name} imports {sorted(inside)}: models/ may use only models/ and config"


@pytest.mark.parametrize("part, forbidden", [
    ("styleray.datasets", ("styleray.platform", "styleray.serve", "styleray.settings")),
    ("styleray.serve", ("styleray.platform.train", "styleray.platform.tune", "styleray.platform.manager")),
    ("styleray.settings", ("styleray.platform", "styleray.datasets", "styleray.serve", "styleray.models")),
    ("styleray.storage", ("styleray.platform", "styleray.datasets", "styleray.serve", "styleray.models")),
])
def test_parts_keep_to_their_lane(part, forbidden):
    for name, deps in GRAPH.items():
        if _under(name, part):
            bad = sorted(d for d in deps if any(_under(d, f) for f in forbidden))
            assert not bad, f"{name} imports {bad}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
