"""The package layering: imports point one way, and the cheap modules stay cheap (no diffusers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "ip_adapter", "base_models", "patchdpo", "dreambench", "patch_quality", "training_data", "stand_ins")
# What each package may import of the others; anything else is an upward or sideways import.
ALLOWED = {
    "common": set(),
    "ip_adapter": {"common"},
    "base_models": {"common", "ip_adapter"},
    "patchdpo": {"common", "ip_adapter", "base_models", "patch_quality"},
    "dreambench": {"common", "ip_adapter", "base_models"},
    "patch_quality": {"common", "ip_adapter", "base_models"},
    "training_data": {"common", "ip_adapter", "base_models", "patch_quality"},
    "stand_ins": {"common", "ip_adapter", "base_models", "patch_quality"},
}


def package_imports(package: str) -> dict[str, set[str]]:
    """For each module of `package`, the other project packages it imports (at any depth of the file)."""
    found = {}
    for path in sorted((ROOT / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        found[f"{package}/{path.name}"] = {name for name in names if name in PACKAGES and name != package}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package):
    wrong = {module: sorted(imported - ALLOWED[package]) for module, imported in package_imports(package).items()}
    assert not {module: names for module, names in wrong.items() if names}


def sibling_imports(package: str) -> dict[str, set[str]]:
    """For each module of `package`, the modules of the same package it imports (relative or absolute, type-only included)."""
    modules = {path.stem for path in (ROOT / package).glob("*.py")}
    found = {}
    for path in sorted((ROOT / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (node.level == 1 or node.module.startswith(f"{package}.")):
                names.add(node.module.split(".")[-1] if node.level == 0 else node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                names.update(alias.name for alias in node.names)
        found[path.stem] = (names & modules) - {path.stem}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    assert find_cycle(sibling_imports(package)) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"] and find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_code_never_imports_the_stand_ins():
    for package in set(PACKAGES) - {"stand_ins"}:
        for module, imported in package_imports(package).items():
            assert "stand_ins" not in imported, module


@pytest.mark.parametrize(
    "module",
    [f"common.{path.stem}" for path in sorted((ROOT / "common").glob("*.py")) if path.stem != "__init__"]
    + ["patch_quality.store", "dreambench.benchmark"],
)
def test_cheap_modules_do_not_load_diffusers(module):
    code = f"import sys, {module}; assert 'diffusers' not in sys.modules, 'diffusers loaded'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_no_package_function_is_longer_than_about_70_lines():
    """The issue's bound: a function a reader can hold on one screen (scripts and tests aside)."""
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 70:
                    long.append(f"{package}/{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long
