"""The shape the design promises, held by tests: the loop and the CLI never name a backend, and
imports point one way (config -> dist -> engines -> loop -> cli)."""

from __future__ import annotations

import ast
import re
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


def _module_imports(path: Path) -> set[str]:
    """The scaletrain modules a file imports, at module granularity (`from scaletrain import dist` is
    `scaletrain.dist`; `from scaletrain.engines import Engine` is `scaletrain.engines`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("scaletrain"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scaletrain"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (SRC.parent / (sub.replace(".", "/") + ".py")).is_file() or (
                    SRC.parent / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.relative_to(SRC).as_posix())
def test_module_docstring_imports_line_is_true(path: Path):
    """A module docstring that states its imports ("Imports: ... `scaletrain.x` ...") states all of
    them and no others; one that says it imports nothing of ours imports none."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    if "Imports" not in doc:
        return
    text = " ".join(doc[doc.index("Imports"):].split())
    listed = set(re.findall(r"`(scaletrain(?:\.\w+)*)`", text))
    actual = _module_imports(path) - {"scaletrain"}
    if "nothing of ours" in text:
        assert not actual, f"{path.name} says it imports nothing of ours but imports {sorted(actual)}"
        return

    def covered(name: str, by: set[str]) -> bool:
        return any(name == b or name.startswith(b + ".") or b.startswith(name + ".") for b in by)

    unlisted = sorted(a for a in actual if not covered(a, listed))
    unused = sorted(x for x in listed if not covered(x, actual))
    assert not unlisted and not unused, f"{path.name}: imported but not listed {unlisted}; listed but not imported {unused}"
