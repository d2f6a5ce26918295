"""The shape the design promises, held by tests: the loop and the CLI never name a backend, and
imports point one way (config -> dist -> engines -> loop -> cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "scaletrain"
BACKEND_WORDS = ("ddp", "fsdp", "deepspeed", "zero")


def _tree(module: str) -> ast.Module:
    return ast.parse((SRC / (module.replace(".", "/") + ".py")).read_text())


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("scaletrain")}


@pytest.mark.parametrize("module", ["loop", "cli"])
def test_loop_and_cli_name_no_backend(module: str):
    tree = _tree(module)
    skip = _docstrings(tree)
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            words = node.value.lower().replace("=", " ").replace(":", " ").split()
            offenders += [node.value for w in words if w in BACKEND_WORDS]
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if any(w in BACKEND_WORDS for w in name.lower().split("_")):
                offenders.append(name)
    for name in _imports(tree):
        if name.startswith("scaletrain.engines.") and name.split(".")[2] not in ("registry", "Engine", "EngineSpec"):
            offenders.append(name)
    assert not offenders, f"{module}.py names backends: {offenders}"


# module -> packages it must never import (directly or lazily)
FORBIDDEN = {
    "config": ("scaletrain.dist", "scaletrain.engines", "scaletrain.loop", "scaletrain.cli", "scaletrain.model"),
    "ds_config": ("scaletrain.dist", "scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "checkpoint.layout": ("scaletrain.dist", "scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "dist": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli", "scaletrain.checkpoint"),
    "model": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli", "scaletrain.dist"),
    "data": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "optim": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli", "scaletrain.dist"),
    "parallel": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "callbacks": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "train_state": ("scaletrain.engines", "scaletrain.loop", "scaletrain.cli"),
    "engines.base": ("scaletrain.loop", "scaletrain.cli"),
    "engines.torch_native": ("scaletrain.loop", "scaletrain.cli"),
    "engines.deepspeed_zero": ("scaletrain.loop", "scaletrain.cli"),
    "engines.registry": ("scaletrain.loop", "scaletrain.cli"),
    "loop": ("scaletrain.cli",),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_imports_point_one_way(module: str):
    bad = [m for m in _imports(_tree(module)) if m.startswith(FORBIDDEN[module])]
    assert not bad, f"{module} imports {bad}"


def test_nothing_imports_cli():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("").as_posix().replace("/", ".")
        if rel in ("cli", "__main__"):
            continue
        assert "scaletrain.cli" not in _imports(ast.parse(path.read_text())), rel
