"""Hostile and broken inputs across checkpoints, data folders, configs, CLI arguments and launch
scripts. Each case is refused-cleanly (a ScaletrainError / exit 2 with one line), accepted, or
crashed (any other exception, or a traceback). No case may crash or run code; the table is printed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scaletrain import cli
from scaletrain.checkpoint.dcp_safe import read_metadata
from scaletrain.config import load_config
from scaletrain.data.format import read_meta
from scaletrain.errors import ScaletrainError
from scaletrain.model.weights import load_weights_file

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES: list[tuple[str, str, str]] = []


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(fn: Callable[[], object]) -> str:
    try:
        rc = fn()
    except ScaletrainError as e:
        return "refused-cleanly" if "\n" not in str(e) else "crashed"
    except Exception as e:
        return f"crashed ({type(e).__name__})"
    if isinstance(rc, int) and rc == 2:
        return "refused-cleanly"
    return "accepted"


def _cli(argv: list[str], capsys, *, damage_is_refusal: bool = False) -> Callable[[], int]:
    """`inspect --verify` refuses a damaged tag by its exit code 1 (damage found), the others by 2."""

    def go() -> int:
        rc = cli.main(argv)
        out = capsys.readouterr()
        if "Traceback" in out.err or (rc == 2 and len([ln for ln in out.err.splitlines() if ln.strip()]) != 1):
            raise RuntimeError(f"not one line: {out.err!r}")
        return 2 if damage_is_refusal and rc == 1 and "DAMAGED" in out.out else rc

    return go


def _data(tmp: Path, **meta: object) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    (np.arange(600) % 200).astype(np.uint16).tofile(d / "train.bin")
    (np.arange(300) % 200).astype(np.uint16).tofile(d / "val.bin")
    m = {"vocab_size": 256, "dtype": "uint16", "train_tokens": 600, "val_tokens": 300}
    m.update(meta)
    (d / "meta.json").write_text(json.dumps(m))
    return d


def _ckpt_cases(tmp: Path, marker: Path, capsys) -> dict[str, Callable[[], object]]:
    def metadata(payload: bytes) -> Callable[[], object]:
        d = tmp / f"dcp{len(os.listdir(tmp))}"
        d.mkdir()
        (d / ".metadata").write_bytes(payload)
        return lambda: read_metadata(d)

    pt = tmp / "evil.pt"
    pt.write_bytes(pickle.dumps({"w": _Boom(marker)}))
    st = tmp / "trunc.safetensors"
    st.write_bytes((10**9).to_bytes(8, "little") + b'{"w": ')
    dots = tmp / "run_dots" / "ckpt" / "step_00000001"
    dots.mkdir(parents=True)
    (dots / "meta.json").write_text(json.dumps({"step": 1, "files": {"../../../../outside": "0" * 64}}))
    (tmp / "run_dots" / "ckpt" / "latest").write_text("step_00000001")
    real = tmp / "elsewhere"
    real.mkdir()
    link_root = tmp / "run_link" / "ckpt"
    link_root.mkdir(parents=True)
    (link_root / "step_00000001").symlink_to(real)
    (link_root / "latest").write_text("step_00000001")
    return {
        "dcp .metadata REDUCE os.system": metadata(pickle.dumps(_Boom(marker), protocol=4)),
        "dcp .metadata garbage": metadata(b"\x80\x04not a pickle"),
        "dcp .metadata empty": metadata(b""),
        ".pt weights with pickled REDUCE": lambda: load_weights_file(pt),
        "truncated safetensors header": lambda: load_weights_file(st),
        "inspect: tag meta.json with .. file names": _cli(["inspect", str(tmp / "run_dots" / "ckpt"), "--verify"],
                                                          capsys, damage_is_refusal=True),
        "consolidate: symlinked tag": _cli(["consolidate", str(link_root), "--out", str(tmp / "o.st")], capsys),
    }


def _data_cases(tmp: Path) -> dict[str, Callable[[], object]]:
    cases = {}
    for name, meta in {
        "meta.json dtype float64": {"dtype": "float64"},
        "meta.json negative counts": {"train_tokens": -5},
        "meta.json vocab 0": {"vocab_size": 0},
        "meta.json max_token_id above vocab": {"max_token_id": 999},
        "meta.json not an object": None,
    }.items():
        sub = tmp / name.replace(" ", "_")
        sub.mkdir()
        d = _data(sub, **(meta or {}))
        if meta is None:
            (d / "meta.json").write_text("[1, 2]")
        cases[name] = lambda d=d: read_meta(d)
    sub = tmp / "missing_bin"
    sub.mkdir()
    d = _data(sub)
    (d / "val.bin").unlink()
    cases["missing val.bin"] = lambda: read_meta(d)
    return cases


def _config_cases(tmp: Path) -> dict[str, Callable[[], object]]:
    nontable = tmp / "a.toml"
    nontable.write_text("[[train]]\nmax_steps = 1\n")
    nondict = tmp / "b.json"
    nondict.write_text("[1, 2]")
    yml = tmp / "c.yaml"
    yml.write_text("run: !!python/object/apply:os.system ['true']\n")
    return {
        "optim.lr=inf": lambda: load_config(None, ["optim.lr=inf"]),
        "optim.eps=nan": lambda: load_config(None, ["optim.eps=nan"]),
        "run.seed=2**64": lambda: load_config(None, [f"run.seed={2**64}"]),
        "train.max_steps=true": lambda: load_config(None, ["train.max_steps=true"]),
        "unknown key": lambda: load_config(None, ["optim.lrr=1"]),
        "TOML array of tables": lambda: load_config(nontable),
        "JSON top level not a table": lambda: load_config(nondict),
        "YAML !!python/object tag": lambda: load_config(yml),
    }


def _cli_cases(tmp: Path, capsys) -> dict[str, Callable[[], int]]:
    f = tmp / "afile"
    f.write_text("x")
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    txt = tmp / "in.txt"
    txt.write_text("some text " * 100)
    notck = tmp / "notck"
    notck.mkdir()
    return {
        "prepare --out an existing file": _cli(["prepare", str(txt), "--out", str(f)], capsys),
        "prepare into a non-empty folder": _cli(["prepare", str(txt), "--out", str(full)], capsys),
        "consolidate of a non-checkpoint folder": _cli(["consolidate", str(notck)], capsys),
        "inspect of a missing folder": _cli(["inspect", str(tmp / "nope")], capsys),
        "override without =": _cli(["config", "show", "nonsense"], capsys),
        "config show optim.lr=inf": _cli(["config", "show", "optim.lr=inf"], capsys),
    }


def _launch_cases() -> dict[str, Callable[[], object]]:
    import importlib.util

    # The shell checks live with the unit tests; load that module by path (tests/ is not a package).
    spec = importlib.util.spec_from_file_location("hardening_shell", Path(__file__).parents[1] / "unit" / "test_hardening_shell.py")
    shell = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shell)
    SCRIPTS, static_problems = shell.SCRIPTS, shell.static_problems

    cases: dict[str, Callable[[], object]] = {}
    for s in SCRIPTS:
        def check(s: Path = s) -> None:
            if subprocess.run(["bash", "-n", str(s)], capture_output=True).returncode:
                raise ScaletrainError(f"{s.name}: bash -n fails")
            problems = static_problems(s)
            if problems:
                raise ScaletrainError("; ".join(problems))

        cases[f"static check {s.name}"] = check
    return cases


EXPECT_ACCEPTED = {"launch"}  # a clean script "accepts" the static check; the rest must be refused


@pytest.mark.parametrize("category", ["checkpoints", "data", "configs", "cli", "launch"])
def test_security_category(category: str, tmp_path: Path, capsys, request) -> None:
    marker = tmp_path / "PWNED"
    cases = {
        "checkpoints": lambda: _ckpt_cases(tmp_path, marker, capsys),
        "data": lambda: _data_cases(tmp_path),
        "configs": lambda: _config_cases(tmp_path),
        "cli": lambda: _cli_cases(tmp_path, capsys),
        "launch": _launch_cases,
    }[category]()
    assert len(cases) >= 5
    bad = []
    for name, fn in cases.items():
        outcome = _run(fn)
        OUTCOMES.append((category, name, outcome))
        want = "accepted" if category in EXPECT_ACCEPTED else "refused-cleanly"
        if outcome != want:
            bad.append(f"{name}: {outcome}")
    assert not marker.exists(), "a hostile input ran code"
    with capsys.disabled():
        print()
        for row in OUTCOMES[-len(cases):]:
            print(" | ".join(row))
    assert not bad, bad
