"""scaletrain.fit in this process: results, checkpoint pointers, eval_only, checkpoint.policy=best,
and a caller left as it was found (signal handlers, environment, no process group or thread)."""

from __future__ import annotations

import json
import signal
import sys
import threading

import pytest
from helpers import REPO, child_env, read_metrics, run_cmd, tiny_overrides

import scaletrain
from scaletrain import dist
from scaletrain.checkpoint import layout
from scaletrain.errors import ConfigError


def test_fit_returns_the_checkpoints_the_pointers_name(tiny_data, tmp_path):
    out = tmp_path / "run"
    def handler(signum, frame):  # a caller's own handler must be back afterwards
        return None

    previous = signal.signal(signal.SIGTERM, handler)
    threads_before = {t.ident for t in threading.enumerate()}
    try:
        result = scaletrain.fit(tiny_overrides(tiny_data, out, **{
            "train.max_steps": 6, "train.eval_every": 2, "checkpoint.every": 2, "checkpoint.keep_last": 1}))
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    ckpt = out / "ckpt"
    assert result.last_step == 6 and result.best_val_loss is not None
    assert result.latest_checkpoint == ckpt / layout.read_pointer(ckpt) == ckpt / "step_00000006"
    assert result.best_checkpoint == ckpt / layout.read_pointer(ckpt, layout.BEST_FILE)
    assert result.best_checkpoint.is_dir()
    assert json.loads((result.best_checkpoint / "meta.json").read_text())["val_loss"] == result.best_val_loss
    import torch.distributed as tdist

    assert not tdist.is_initialized() and dist.native_comm_threads() == []
    assert not [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]


def test_fit_takes_a_mapping_and_rejects_bad_input(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        scaletrain.fit({"optim": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="key=value"):
        scaletrain.fit([1, 2])
    # plan_run fails before any process group exists; handlers and environment are still put back
    with pytest.raises(ConfigError, match="eval_steps"):
        scaletrain.fit({"data": {"path": str(tiny_data)}, "run": {"out_dir": str(tmp_path / "r")},
                        "train": {"eval_only": True, "eval_steps": 0}})


def test_policy_best_saves_only_improvements_and_eval_only_evaluates(tiny_data, tmp_path):
    out = tmp_path / "run"
    # lr 2.0 diverges after the first evaluations: the periodic saves stop once val loss gets worse
    over = tiny_overrides(tiny_data, out, **{
        "train.max_steps": 8, "train.eval_every": 1, "checkpoint.policy": "best", "checkpoint.keep_last": 50,
        "optim.lr": 0.5, "schedule.warmup_steps": 0, "schedule.kind": "constant"})
    result = scaletrain.fit(over)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    running, improving = float("inf"), []
    for step in sorted(vals):
        if vals[step] < running:
            running = vals[step]
            improving.append(step)
    saved = [layout.tag_step(p.name) for p in layout.tags(out / "ckpt")]
    assert saved == sorted(set(improving) | {8}), (vals, saved)
    assert len(saved) < 8  # some evaluations did not improve, so were not saved
    assert result.latest_checkpoint.name == "step_00000008"
    assert result.best_checkpoint.name == layout.tag_name(min(vals, key=vals.get))

    tags_before = sorted(p.name for p in (out / "ckpt").iterdir())
    again = scaletrain.fit([*over, "train.eval_only=true"])
    assert again.last_step == 8 and again.final_val_loss == pytest.approx(vals[8], rel=1e-6)
    last = read_metrics(out)[-1]
    assert last["eval_only"] is True and last["step"] == 8 and last["val_loss"] == again.final_val_loss
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == tags_before  # nothing saved

    with pytest.raises(ConfigError, match="eval_only"):
        scaletrain.fit(tiny_overrides(tiny_data, tmp_path / "fresh", **{"train.eval_only": True}))


def test_python_dash_m_and_the_example(tmp_path):
    help_out = run_cmd([sys.executable, "-m", "scaletrain", "--help"], timeout=60, check=True)
    assert "train" in help_out.stdout and "sweep" in help_out.stdout
    res = run_cmd([sys.executable, str(REPO / "examples" / "fit_api.py"), str(tmp_path / "ex")], timeout=120,
                  check=True, env=child_env())
    assert "best:" in res.stdout and "eval_only: val_loss" in res.stdout


@pytest.mark.parametrize("overrides", [{"train.max_steps": 5}, {"schedule.kind": "constant", "optim.lr": 1e-9, "train.max_steps": 30}],
                         ids=["short-run", "tiny-constant-lr"])
def test_a_run_on_defaults_the_user_did_not_set_trains(tiny_data, tmp_path, overrides):
    """Leftover 1 as a user meets it: only the keys named here are set besides data and folder, and the
    run trains to its end and saves."""
    from helpers import read_metrics

    out = tmp_path / "run"
    result = scaletrain.fit([f"data.path={tiny_data}", f"run.out_dir={out}", "model.n_layer=1", "model.n_embd=32",
                             "model.n_head=2", "model.block_size=32", "train.micro_batch_size=2",
                             "logging.console=false", "train.eval_steps=1",
                             *(f"{k}={v}" for k, v in overrides.items())])
    steps = overrides.get("train.max_steps", 200)
    assert result.last_step == steps and result.latest_checkpoint.name == f"step_{steps:08d}"
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == steps
