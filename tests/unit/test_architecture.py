"""The shape the design promises, held by tests: imports point one way through the layers (ground floor
-> data, model -> checkpoint -> engines -> train -> experiments -> commands -> cli/api), with no circle;
only the engines and the checkpoint format modules branch on a backend's name; and the pieces stay
small (modules, functions, no repeated blocks)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "scaletrain"
BACKEND_WORDS = ("ddp", "fsdp", "deepspeed", "zero", "tp")

# Layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = (
    ("errors", "config", "io", "hooks", "logs", "procs", "hostmem", "dist", "objective", "optim"),
    ("data", "model"),
    ("checkpoint",),
    ("engines",),
    ("train",),
    ("experiments",),
    ("commands",),
    ("api", "cli", "__init__", "__main__"),
)
# Modules that may branch on a backend's name: the backend modules, the engine modules they build, and
# the checkpoint modules that read and write each backend's own files. The registry, the planner and
# conversion ask the backend objects instead.
BACKEND_AWARE = ("engines.backends.", "engines.torch_native", "engines.deepspeed_zero", "engines.ds_config",
                 "engines.parallel", "engines.tensor_parallel", "engines.grads", "engines.base",
                 "checkpoint.torch_state", "checkpoint.deepspeed_state", "checkpoint.zero_layout",
                 "checkpoint.dcp_safe", "checkpoint.readers", "checkpoint.portable")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = {"": 60, "train.": 40}
REPEAT_LINES = 6


def _name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("").as_posix().replace("/", ".")
    return rel.removesuffix(".__init__") if rel != "__init__" else rel


MODULES = {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module of ours a dotted import names (`scaletrain.engines.base.Engine` -> `engines.base`)."""
    name = name.removeprefix("scaletrain").lstrip(".")
    if not name:
        return "__init__"
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Modules of ours that a file imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names if a.name.startswith("scaletrain"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scaletrain"):
            found.update(_resolve(f"{node.module}.{a.name}") for a in node.names)
    found.discard(None)
    return found - {_name(path)}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    found = [i for i, group in enumerate(LAYERS) if top in group]
    assert found, f"{module} is in no layer: add it to LAYERS"
    return found[0]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_point_down_the_layers():
    up = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                if _layer(t) > _layer(m) and m != "__init__")
    assert not up, f"imports against the layering: {up}"


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(("package", "forbidden"), [("checkpoint", ("engines", "commands", "train")),
                                                     ("train", ("commands", "experiments")),
                                                     ("engines", ("train", "commands"))])
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]):
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.split(".")[0] == package
                 for t in targets if t.split(".")[0] in forbidden)
    assert not bad, bad


def test_nothing_imports_cli():
    assert not [m for m, targets in GRAPH.items() if "cli" in targets and m != "__main__"]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _backend_words(node: ast.AST) -> list[str]:
    values = [node] if isinstance(node, ast.Constant) else getattr(node, "elts", [])
    return [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)
            and v.value.lower().partition(":")[0] in BACKEND_WORDS]


def _branches_on_backend(tree: ast.AST) -> list[str]:
    """Comparisons and matches against a backend's name (`kind == "deepspeed"`, `in ("ddp", "fsdp")`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                found += _backend_words(side)
        elif isinstance(node, ast.match_case):
            found += [w for p in ast.walk(node.pattern) if isinstance(p, ast.MatchValue)
                      for w in _backend_words(p.value)]
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(BACKEND_AWARE)))
def test_only_engines_branch_on_a_backend_name(module: str):
    found = _branches_on_backend(ast.parse(MODULES[module].read_text()))
    assert not found, f"{module} branches on backend names {found}: ask the backend registry instead"


@pytest.mark.parametrize("module", ["train.loop", "cli", "commands.train"])
def test_loop_and_cli_name_no_backend(module: str):
    tree = ast.parse(MODULES[module].read_text())
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
    bad_imports = [t for t in GRAPH[module] if t.startswith("engines.") and t not in ("engines.registry", "engines.base")]
    assert not offenders and not bad_imports, f"{module} names backends: {offenders} {bad_imports}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module: str):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{module} has {n} lines (at most {MAX_MODULE_LINES}): split it by concept"


def test_function_sizes():
    too_long = []
    for module, path in MODULES.items():
        limit = min(v for k, v in MAX_FUNCTION_LINES.items() if module.startswith(k))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    too_long.append(f"{module}.{node.name}: {n} lines (at most {limit})")
    assert not too_long, too_long


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines that carry code, stripped: no blank lines, comments, docstrings or import lines."""
    text = path.read_text()
    tree = ast.parse(text)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if i in skip or not s or s.startswith("#") or re.fullmatch(r"[)\]}]+,?:?", s):
            continue
        out.append((i, s))
    return out


def test_no_repeated_blocks():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for module, path in MODULES.items():
        lines = _code_lines(path)
        for k in range(len(lines) - REPEAT_LINES + 1):
            window = tuple(s for _, s in lines[k:k + REPEAT_LINES])
            seen[window].append(f"{module}:{lines[k][0]}")
    repeated = {w: where for w, where in seen.items() if len(where) > 1}
    assert not repeated, "blocks of {} lines written twice: {}".format(
        REPEAT_LINES, sorted(" = ".join(v) for v in repeated.values())[:10])


def _module_imports(path: Path) -> set[str]:
    """The scaletrain modules a file imports, at module granularity (`from scaletrain import dist` is
    `scaletrain.dist`; `from scaletrain.engines.base import Engine` is `scaletrain.engines.base`)."""
    return {f"scaletrain.{m}" if m != "__init__" else "scaletrain" for m in _imports(path)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_docstring_imports_line_is_true(module: str):
    """A module docstring that states its imports ("Imports: ... `scaletrain.x` ...") states all of
    them and no others; one that says it imports nothing of ours imports none."""
    path = MODULES[module]
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    if "Imports" not in doc:
        return
    text = " ".join(doc[doc.index("Imports"):].split())
    listed = set(re.findall(r"`(scaletrain(?:\.\w+)*)`", text))
    actual = _module_imports(path) - {"scaletrain"}
    if "nothing of ours" in text:
        assert not actual, f"{module} says it imports nothing of ours but imports {sorted(actual)}"
        return

    def covered(name: str, by: set[str]) -> bool:
        return any(name == b or name.startswith(b + ".") or b.startswith(name + ".") for b in by)

    unlisted = sorted(a for a in actual if not covered(a, listed))
    unused = sorted(x for x in listed if not covered(x, actual))
    assert not unlisted and not unused, f"{module}: imported but not listed {unlisted}; listed but not imported {unused}"
