"""Callbacks plug into the loop from outside: they see every record, evaluation and save, and a stop
one rank requests is agreed on every rank (the same last step everywhere, a checkpoint of it)."""

from __future__ import annotations

from pathlib import Path

from helpers import read_metrics, spawn, tiny_overrides


def _run(rank: int, world: int, data: str, out: str, extra: list[str], stop_rank: int, stop_on: str,
         stop_step: int) -> dict:
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.train.callbacks import Callback
    from scaletrain.train.loop import plan_run, train

    events: list = []

    class Recorder(Callback):
        def on_train_start(self, run, state):
            events.append(("start", state.step))

        def on_step_end(self, run, state, record):
            events.append(("step", record["step"]))
            return stop_on == "step" and rank == stop_rank and record["step"] == stop_step

        def on_eval(self, run, state, val_loss):
            events.append(("eval", state.step))
            return stop_on == "eval" and rank == stop_rank and state.step == stop_step

        def on_save(self, run, state, tag_dir):
            events.append(("save", Path(tag_dir).name))

        def on_train_end(self, run, state, result):
            events.append(("end", None if result is None else result.last_step))

    cfg = load_config(None, [*tiny_overrides(Path(data), Path(out), **{"train.max_steps": 8}), *extra])
    plan = plan_run(cfg, world)
    ctx = dist.init(dist.current_launch(), timeout_s=60)
    try:
        result = train(plan, ctx, callbacks=[Recorder()])
    finally:
        dist.teardown()
    return {"events": events, "stopped": result.stopped, "preempted": result.preempted, "last": result.last_step}


def test_a_stop_asked_in_on_step_end_by_one_rank_is_agreed(tiny_data: Path, tmp_path: Path):
    """Rank 1 asks at step 3; the vote travels with step 4's loss all-reduce: both ranks end at 4."""
    out = tmp_path / "run"
    results = spawn(_run, args=(str(tiny_data), str(out), [], 1, "step", 3), timeout=180)
    for r in results:
        assert r["stopped"] and not r["preempted"] and r["last"] == 4, r
        assert r["events"] == [("start", 0), *[("step", s) for s in range(1, 5)], ("save", "step_00000004"),
                               ("end", 4)], r["events"]
    assert [rec["step"] for rec in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "ckpt" / "latest").read_text().strip() == "step_00000004"
    assert not (out / ".lease.json").exists()  # the run folder's lease is released at the end


def test_a_stop_asked_in_on_eval_is_agreed_at_once(tiny_data: Path, tmp_path: Path):
    """Evaluations every 2 steps; rank 0 asks at the evaluation of step 4: both ranks save 4 and end."""
    out = tmp_path / "run"
    results = spawn(_run, args=(str(tiny_data), str(out), ["train.eval_every=2"], 0, "eval", 4), timeout=180)
    for r in results:
        assert r["stopped"] and r["last"] == 4, r
        assert ("eval", 2) in r["events"] and ("eval", 4) in r["events"] and ("step", 5) not in r["events"]
        assert r["events"][-2:] == [("save", "step_00000004"), ("end", 4)]
    recs = read_metrics(out)
    assert [rec["step"] for rec in recs] == [1, 2, 3, 4] and "val_loss" in recs[1] and "val_loss" in recs[3]
