"""Item 13: non-finite, out-of-range and bool-for-number config values are one-line ConfigErrors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.config import load_config
from scaletrain.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=Infinity", "optim.lr"),
        ("optim.eps=inf", "optim.eps"),
        ("optim.eps=NaN", "optim.eps"),
        ("optim.weight_decay=inf", "optim.weight_decay"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("backend.timeout_s=inf", "backend.timeout_s"),
        ("backend.timeout_s=nan", "backend.timeout_s"),
        ("backend.timeout_s=1e300", "backend.timeout_s"),
        ("run.seed=18446744073709551616", "run.seed"),
        ("run.seed=9223372036854775808", "run.seed"),
        ("train.max_steps=true", "train.max_steps"),
        ("model.n_layer=false", "model.n_layer"),
        ("train.max_steps=3.5", "train.max_steps"),
        ("optim.lr=true", "optim.lr"),
        ("optim.betas=[true,0.9]", "optim.betas"),
    ],
)
def test_config_rejects_nonfinite_out_of_range_and_bool(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert field in msg and "\n" not in msg


def test_config_typed_values_still_work(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.max_steps=3", "optim.lr=1", "run.out_dir=runs/x", "optim.betas=[0.8,0.9]",
                             "run.seed=0", "schedule.warmup_steps=0", "schedule.min_lr=0"])
    assert cfg.train.max_steps == 3 and cfg.optim.lr == 1.0 and cfg.run.out_dir == Path("runs/x")
    assert cfg.optim.betas == (0.8, 0.9)
    f = tmp_path / "c.toml"
    f.write_text('[train]\nmax_steps = 7\n[schedule]\nwarmup_steps = 0\n[run]\nout_dir = "runs/y"\n[backend]\ntimeout_s = 30\n')
    cfg = load_config(f)
    assert cfg.train.max_steps == 7 and cfg.run.out_dir == Path("runs/y") and cfg.backend.timeout_s == 30.0


def test_config_inf_through_real_cli_exits_2_one_line() -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    r = subprocess.run(
        [sys.executable, "-m", "scaletrain.cli", "config", "show", "optim.lr=inf"],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "optim.lr" in lines[0] and "Traceback" not in r.stderr
