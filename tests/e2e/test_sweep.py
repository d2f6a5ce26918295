"""`scaletrain sweep`: a seeded Optuna study over optim.lr with 2 processes per trial, median pruning,
a SIGKILL of the sweep mid-trial (its trial processes must die with it), a re-run that finishes the
study without repeating finished trials, and best.toml that loads. Plus the space file's checks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import child_env, kill_tree, run_cmd, tiny_overrides

from scaletrain.config import config_to_toml, load_config
from scaletrain.errors import ConfigError
from scaletrain.experiments.sweep import load_space

optuna = pytest.importorskip("optuna")

SPACE = '["optim.lr"]\ntype = "float"\nlow = 1e-5\nhigh = 3.0\nlog = true\n'


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def _descendants(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


@pytest.mark.timeout(240)
def test_sweep_prunes_survives_a_kill_and_continues(tiny_data, tmp_path):
    base = tmp_path / "base.toml"
    base.write_text(config_to_toml(load_config(None, tiny_overrides(tiny_data, tmp_path / "unused", **{
        "train.max_steps": 6, "train.eval_every": 2, "schedule.kind": "constant", "schedule.warmup_steps": 0,
        "schedule.min_lr": 1e-6}))))
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scaletrain", "sweep", "--config", base, "--space", space, "--trials", "3",
           "--out", out, "--nproc", "2", "--seed", "3", "--pruner", "median", "--pruner-startup-trials", "1",
           "--heartbeat-interval", "1", "--grace-period", "2"]
    env = child_env()

    # 1. Run until trial 1's processes are up, then SIGKILL the sweep's process group (not its trials').
    sweep = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while time.monotonic() < deadline and sweep.poll() is None:
            kids = _descendants(sweep.pid)
            if (out / "trial-1").is_dir() and len(kids) >= 3:  # torchrun and its 2 workers
                break
            time.sleep(0.1)
        assert sweep.poll() is None and len(kids) >= 3, sweep.communicate()[0][-3000:] if sweep.poll() is not None else kids
        time.sleep(1.0)
        kids = sorted(set(kids) | set(_descendants(sweep.pid)))
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=10)
        deadline = time.monotonic() + 8
        while _alive(kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(kids), f"trial processes outlived the sweep: {_alive(kids)}"
    finally:
        kill_tree(sweep.pid)
        for pid in _alive(kids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    trial0 = out / "trial-0" / "metrics.jsonl"
    before = trial0.stat().st_mtime_ns

    # 2. Run again: the killed trial is failed as stale, fresh trials bring the study to 3 finished.
    time.sleep(2.5)  # the killed trial's heartbeat is older than the grace period now
    res = run_cmd(cmd, timeout=180, env=env, cwd=tmp_path, check=True)
    study = optuna.load_study(study_name="base", storage=f"sqlite:///{out / 'study.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "COMPLETE" and states[1] == "FAIL" and "fail_reason" not in study.trials[1].user_attrs
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3 and len(study.trials) == 4, states
    assert trial0.stat().st_mtime_ns == before  # trial 0 was not run again
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, f"no trial pruned: {states}\n{res.stdout}"
    for t in pruned:  # a pruned trial stopped at an evaluation and kept its checkpoint
        run_dir = Path(t.user_attrs["run_dir"])
        assert (run_dir / "ckpt" / "latest").is_file() and t.user_attrs["pruned_at_step"] < 6
    assert "trial" in res.stdout and "PRUNED" in res.stdout and "trial-0" in res.stdout

    # 3. best.toml is the base config plus the best parameters, and loads.
    best = out / "best.toml"
    shown = run_cmd([sys.executable, "-m", "scaletrain", "config", "show", "--config", best], timeout=60, check=True)
    assert load_config(best).optim.lr == pytest.approx(study.best_params["optim.lr"])
    assert "[optim]" in shown.stdout

    # 4. Asking for the same total again runs nothing new.
    again = run_cmd(cmd, timeout=60, env=env, cwd=tmp_path, check=True)
    assert len(optuna.load_study(study_name="base", storage=f"sqlite:///{out / 'study.db'}").trials) == 4
    assert "best: trial" in again.stdout


@pytest.mark.parametrize("text,message", [
    ('["optim.lrr"]\ntype = "float"\nlow = 1\nhigh = 2\n', "optim.lrr"),
    ('["optim"]\ntype = "float"\nlow = 1\nhigh = 2\n', "not a config key"),
    ('["optim.lr"]\ntype = "floaty"\nlow = 1\nhigh = 2\n', "type must be one of"),
    ('["optim.lr"]\ntype = "float"\nlow = 2\nhigh = 1\n', "must be below high"),
    ('["optim.lr"]\ntype = "float"\nlow = 0\nhigh = 1\nlog = true\n', "needs low > 0"),
    ('["train.max_steps"]\ntype = "int"\nlow = 1.5\nhigh = 4\n', "integer"),
    ('["schedule.kind"]\ntype = "categorical"\nchoices = []\n', "non-empty"),
    ('["optim.lr"]\ntype = "float"\nlow = 1\nhigh = 2\nsetp = 1\n', "unknown field 'setp'"),
    ('', "empty"),
])
def test_space_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_space(path)
    assert "\n" not in str(e.value) and "space.toml" in str(e.value)


def test_space_values_must_make_valid_configs(tmp_path):
    from scaletrain.experiments.sweep import check_space

    path = tmp_path / "space.toml"
    path.write_text('["schedule.kind"]\ntype = "categorical"\nchoices = ["cosine", "sometimes"]\n')
    with pytest.raises(ConfigError, match=r"schedule\.kind.*sometimes"):
        check_space(load_space(path), None, [])
    res = run_cmd([sys.executable, "-m", "scaletrain", "sweep", "--space", path, "--trials", "1",
                   "--out", tmp_path / "o"], timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: space:"), res.stderr
