"""The house: imports point one way with no circle, no module outgrows a newcomer's reading,
and every name and path docs/architecture.md gives exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("transforms", "dicom_heatmap", "pipelines")
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
#: Longest module, in lines.
MAX_LINES = 450
#: (importer prefix, imported prefix) pairs that would point against the layers.
FORBIDDEN = [
    ("transforms", "dicom_heatmap"), ("transforms", "pipelines"),
    ("dicom_heatmap", "pipelines"),
    ("pipelines.training", "pipelines.evaluation"),  # evaluation builds on training, not the reverse
    ("pipelines.training", "pipelines.pacs"), ("pipelines.evaluation", "pipelines.pacs"),
    ("pipelines.pacs", "pipelines.training"), ("pipelines.pacs", "pipelines.evaluation"),
    ("pipelines.training", "pipelines.cli"), ("pipelines.evaluation", "pipelines.cli"),
    # the viewer reads result folders: it needs neither the lab nor the PACS
    ("pipelines.viewer", "pipelines.training"), ("pipelines.viewer", "pipelines.evaluation"),
    ("pipelines.viewer", "pipelines.pacs"), ("pipelines.viewer", "pipelines.cli"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _run_time_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (names for annotations
    only, never imported when the code runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _run_time_nodes(node)


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports when it runs, anywhere in its code (lazy imports too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from package import module" imports the module; "from module import name" the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_imports_point_one_way():
    wrong = [f"{importer} imports {imported}" for importer, imported_set in GRAPH.items() for imported in imported_set
             for low, high in FORBIDDEN if _within(importer, low) and _within(imported, high)]
    assert not wrong, wrong


def test_no_module_imports_itself_round_a_circle():
    # a package's __init__ importing its own modules is not a circle of the code's design
    graph = {name: {t for t in targets if not (MODULES[t].name == "__init__.py" and _within(name, t))}
             for name, targets in GRAPH.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _dotted_names() -> list[str]:
    names = re.findall(r"`((?:transforms|dicom_heatmap|pipelines)(?:\.\w+)+)`", ARCHITECTURE)
    return sorted(set(names))


def test_the_architecture_page_names_things_of_each_layer():
    names = _dotted_names()
    assert len(names) > 40 and all(any(n.startswith(p + ".") for n in names) for p in PACKAGES)


@pytest.mark.parametrize("dotted", _dotted_names())
def test_every_name_the_architecture_page_gives_exists(dotted):
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            assert hasattr(target, attribute), f"{dotted}: {'.'.join(parts[:split])} has no {attribute}"
            target = getattr(target, attribute)
        return
    pytest.fail(f"{dotted}: no such module")


def test_every_path_the_architecture_page_gives_exists():
    paths = set(re.findall(r"`((?:transforms|dicom_heatmap|pipelines|tests|docs)/[\w/.]*)`", ARCHITECTURE))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
