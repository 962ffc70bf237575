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


# The modules that define the command lines: the parsers and the shared flag groups, light for --help.
# Everything else gets the typed config a script builds once from its flags (`common.cli.parse_config`).
FLAG_MODULES = {"common/cli.py", "common/flags.py", "patch_quality/cli.py", "patchdpo/cli.py", "training_data/cli.py"}


def flag_uses(source: str) -> list[str]:
    """Where `source` imports argparse or has a parameter that takes a Namespace (annotated so, or named `args` and not a tuple)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "argparse" for alias in node.names):
            found.append(f"line {node.lineno}: import argparse")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append(f"line {node.lineno}: from argparse import")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for parameter in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                annotation = ast.unparse(parameter.annotation) if parameter.annotation is not None else ""
                if "Namespace" in annotation or (parameter.arg == "args" and not annotation.startswith("tuple")):
                    found.append(f"line {node.lineno}: {getattr(node, 'name', 'lambda')}({parameter.arg}: {annotation or '?'})")
    return found


def package_flag_uses() -> dict[str, list[str]]:
    modules = sorted(path for package in PACKAGES for path in (ROOT / package).glob("*.py"))
    found = {str(path.relative_to(ROOT)): flag_uses(path.read_text()) for path in modules}
    return {module: uses for module, uses in found.items() if uses and module not in FLAG_MODULES}


def test_only_the_flag_modules_use_argparse_or_take_namespaces():
    assert package_flag_uses() == {}


def test_the_flag_check_finds_argparse_and_namespace_parameters():
    assert flag_uses("import argparse") and flag_uses("from argparse import Namespace")
    assert flag_uses("def f(args): pass") and flag_uses("def f(settings: argparse.Namespace): pass")
    assert flag_uses("def f(x, *, options: 'Namespace'): pass") and flag_uses("g = lambda args: args.seed")
    assert not flag_uses("def f(*args, **kwargs): pass") and not flag_uses("def f(config: MapsConfig, args: tuple = ()): pass")


def test_no_package_function_is_longer_than_about_70_lines():
    """The issue's bound: a function a reader can hold on one screen (scripts and tests aside)."""
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 70:
                    long.append(f"{package}/{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long
