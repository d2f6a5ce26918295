"""schedule.kind=plateau over 2 processes, stopped with train.stop_at and resumed: the learning rates
in metrics.jsonl follow ReduceLROnPlateau over the logged validation losses, across the resume."""

from __future__ import annotations

import pytest
from helpers import read_metrics, tiny_overrides, train

from scaletrain.config import ScheduleConfig
from scaletrain.train.state import TrainState


@pytest.mark.timeout(200)
def test_plateau_cuts_on_a_flat_val_loss_across_a_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    peak = 1e-9  # so small that the validation loss stays flat: every evaluation after the first stalls
    over = tiny_overrides(tiny_data, out, **{
        "train.max_steps": 8, "train.eval_every": 1, "optim.lr": peak, "schedule.kind": "plateau",
        "schedule.warmup_steps": 0, "schedule.min_lr": 1e-12, "schedule.patience": 1, "schedule.factor": 0.5,
        "checkpoint.every": 0})
    train([*over, "train.stop_at=4"], nproc=2, timeout=120)
    train(over, nproc=2, timeout=120)
    rows = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert sorted(rows) == list(range(1, 9))
    # Replay the state machine on the logged losses: the lr of step s+1 follows the evaluation at step s.
    cfg = ScheduleConfig(kind="plateau", warmup_steps=0, min_lr=1e-12, patience=1, factor=0.5)
    state, expected = TrainState(), [peak]
    for step in range(1, 8):
        state.record_plateau(rows[step]["val_loss"], cfg, peak)
        expected.append(peak * state.plateau_scale)
    got = [rows[s]["lr"] for s in range(1, 9)]
    assert got == pytest.approx(expected, rel=1e-9)
    # flat loss, patience 1: cuts after the 3rd and 5th evaluations and after the 7th, both sides of step 4
    assert got == pytest.approx([peak] * 3 + [peak / 2] * 2 + [peak / 4] * 2 + [peak / 8], rel=1e-9)


@pytest.mark.timeout(200)
def test_plateau_decides_identically_on_every_rank_under_fit(tiny_data, tmp_path):
    """scaletrain.fit as one rank under torchrun: both ranks see the same lr at every step, cuts included."""
    import json

    from helpers import BIN, REPO, child_env, run_cmd

    out = tmp_path / "run"
    over = tiny_overrides(tiny_data, out, **{
        "train.max_steps": 6, "train.eval_every": 1, "optim.lr": 1e-9, "schedule.kind": "plateau",
        "schedule.warmup_steps": 0, "schedule.min_lr": 1e-12, "schedule.patience": 1, "schedule.factor": 0.5})
    prefix = tmp_path / "lr"
    run_cmd([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "fit_script.py"),
             str(prefix), *over], env=child_env(PYTHONPATH=str(REPO / "tests")), timeout=150, check=True)
    ranks = [json.loads((tmp_path / f"lr.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["lrs"] == ranks[1]["lrs"] and len(ranks[0]["lrs"]) == 6
    assert len(set(ranks[0]["lrs"].values())) >= 2  # at least one cut happened, on both ranks alike
    assert ranks[0]["last_step"] == ranks[1]["last_step"] == 6
    assert ranks[0]["latest"].endswith("step_00000006")
