"""Checkpoint faults from the review, one test per item: a foreign DeepSpeed tag never reaches
DeepSpeed's free unpickling (item 2), a save that fails on one rank ends the job instead of hanging it
(item 5), a slow conversion does not trip the collective timeout (item 9), and a checkpoint of another
model size is one line, not a BaseException traceback (item 10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import losses, spawn, tiny_overrides, train

DS2 = {"backend": "deepspeed", "backend.deepspeed.stage": 2}


def _ds_run(tiny_data: Path, out: Path, nproc: int, **extra) -> None:
    train(tiny_overrides(tiny_data, out, **{**DS2, "train.max_steps": 6, "checkpoint.every": 2, **extra}), nproc=nproc)


def test_item2_a_foreign_deepspeed_tag_is_not_converted(tiny_data: Path, tmp_path: Path):
    """A tag copied in from another run, on another world size, even shipping its own universal folder:
    refused before any DeepSpeed loader runs, with the safe route in one line."""
    _ds_run(tiny_data, tmp_path / "theirs", nproc=2, **{"train.stop_at": 2})
    mine = tmp_path / "mine"
    _ds_run(tiny_data, mine, nproc=1, **{"train.stop_at": 2, "checkpoint.every": 0, "train.max_steps": 2})
    foreign = mine / "ckpt" / "step_00000004"
    shutil.copytree(tmp_path / "theirs" / "ckpt" / "step_00000002", foreign)
    (foreign / "deepspeed_universal" / "deepspeed" / "zero").mkdir(parents=True)  # shipped, unchecksummed
    r = train(tiny_overrides(tiny_data, mine, **{**DS2, "train.max_steps": 6, "checkpoint.resume": str(foreign)}),
              nproc=1, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and "by another run" in r.stderr and "scaletrain convert" in r.stderr
    assert not (foreign / "deepspeed_universal.manifest").exists()


def test_item2_own_tag_conversion_is_fresh_and_checksummed(tiny_data: Path, tmp_path: Path):
    """This run's own tag on another world size: an unverified universal folder left beside it is not
    trusted; the conversion is redone into a fresh folder with a manifest, and the run goes on."""
    run = tmp_path / "r"
    _ds_run(tiny_data, run, nproc=2, **{"train.stop_at": 4})
    tag = run / "ckpt" / "step_00000004"
    planted = tag / "deepspeed_universal" / "deepspeed" / "planted.txt"
    planted.parent.mkdir(parents=True)
    planted.write_text("not from the converter")
    _ds_run(tiny_data, run, nproc=1)
    assert not planted.exists() and (tag / "deepspeed_universal.manifest").is_file()
    assert sorted(losses(run)) == list(range(1, 7))


def _resume_with_slow_conversion(rank: int, world: int, data: str, out: str) -> int:
    import time

    import scaletrain.checkpoint.deepspeed_state as ds_state
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.train.loop import plan_run, train

    real = ds_state.convert_to_universal

    def slow(src, dst):  # longer than backend.timeout_s: the other rank must not be in a collective
        time.sleep(8)
        return real(src, dst)

    ds_state.convert_to_universal = slow
    cfg = load_config(None, tiny_overrides(Path(data), Path(out), **{**DS2, "train.max_steps": 6,
                                                                    "checkpoint.every": 2, "backend.timeout_s": 5}))
    plan = plan_run(cfg, world)
    ctx = dist.init(dist.current_launch(), timeout_s=cfg.backend.timeout_s)
    try:
        return train(plan, ctx).last_step
    finally:
        dist.teardown()


def test_item9_slow_conversion_does_not_trip_the_collective_timeout(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    _ds_run(tiny_data, run, nproc=1, **{"train.stop_at": 2})  # written on 1 process, resumed on 2
    assert spawn(_resume_with_slow_conversion, args=(str(tiny_data), str(run)), timeout=240) == [6, 6]
    assert sorted(losses(run)) == list(range(1, 7))


def _save_fails_on_rank1(rank: int, world: int, data: str, out: str) -> dict:
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.errors import CheckpointError
    from scaletrain.train.plan import plan_run
    from scaletrain.train.run import Run

    cfg = load_config(None, tiny_overrides(Path(data), Path(out), **{**DS2, "backend.timeout_s": 60}))
    plan = plan_run(cfg, world)
    ctx = dist.init(dist.current_launch(), timeout_s=60)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        run = Run(plan, ctx, [])
        run.state.step = 1
        first = run.save(None)
        if rank == 1:
            def disk_full(*args, **kwargs):
                raise OSError(28, "No space left on device")

            run.engine._ds._save_zero_checkpoint = disk_full
        run.state.step = 2
        try:
            run.save(None)
            error = None
        except CheckpointError as e:
            error = str(e)
        run.callbacks.train_end(run.info, run.state, None)
        run.engine.close()
        return {"first": first, "error": error}
    finally:
        dist.teardown()


def test_item5_a_deepspeed_save_failing_on_one_rank_ends_the_job(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    results = spawn(_save_fails_on_rank1, args=(str(tiny_data), str(run)), timeout=180)
    for r in results:
        assert r["first"] is True
        assert r["error"] and "rank 1" in r["error"] and "No space left on device" in r["error"], r
    assert (run / "ckpt" / "latest").read_text().strip() == "step_00000001"
    assert not (run / "ckpt" / "step_00000002").exists()


def test_item10_checkpoint_of_another_model_size_is_one_line(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"backend": "fsdp", "train.max_steps": 2}))
    r = train(tiny_overrides(tiny_data, run, **{"backend": "fsdp", "train.max_steps": 4, "model.n_embd": 64}),
              nproc=1, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in r.stderr
    assert "written for another model" in line and "(256, 32)" in line and "(256, 64)" in line, line


def test_meta_json_records_run_id_and_backend(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 2}))
    meta = json.loads((run / "ckpt" / "step_00000002" / "meta.json").read_text())
    assert meta["run_id"] == (run / "ckpt" / ".run_id").read_text().strip()
    assert meta["backend"] == "ddp" and meta["backend_spec"] == "ddp" and meta["format"] == "sharded"


@pytest.mark.parametrize("leftover", ["dcp", "deepspeed"])
def test_a_tag_of_the_other_family_resumes_through_the_portable_route(tiny_data: Path, tmp_path: Path,
                                                                       leftover: str):
    """A DeepSpeed tag resumed by a torch-native run (and the reverse) is converted on load, says so in
    one notice, and training goes on from its step (it used to be refused)."""
    from helpers import losses

    run = tmp_path / "r"
    extra = DS2 if leftover == "deepspeed" else {}
    train(tiny_overrides(tiny_data, run, **{**extra, "train.max_steps": 2}), nproc=1)
    other = {} if leftover == "deepspeed" else DS2
    r = train(tiny_overrides(tiny_data, run, **{**other, "train.max_steps": 4}), nproc=1)
    assert "resumed from a" in r.stdout + r.stderr, r.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_item3_consolidate_force_replaces_only_its_own_files(tiny_data: Path, tmp_path: Path):
    """`--force --max-shard-size --out DIR` used to empty DIR first. Now: a folder holding anything
    else is refused (nothing deleted), a folder containing the checkpoint is refused, and --force
    replaces only files named like consolidate's own outputs."""
    from helpers import scaletrain

    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 2}), nproc=1)
    ckpt = run / "ckpt"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    r = scaletrain("consolidate", str(ckpt), "--force", "--max-shard-size", "100KB", "--out", str(user))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "notes.txt" in r.stderr, r.stderr
    assert (user / "notes.txt").read_text() == "keep me"
    for inside in (run, ckpt, ckpt / "step_00000002"):  # never the checkpoint's folder or one holding it
        r = scaletrain("consolidate", str(ckpt), "--force", "--max-shard-size", "100KB", "--out", str(inside))
        assert r.returncode == 2 and "overlaps the checkpoint" in r.stderr, r.stderr
    out = tmp_path / "shards"
    assert scaletrain("consolidate", str(ckpt), "--max-shard-size", "100KB", "--out", str(out)).returncode == 0
    first = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".index.json") for n in first) and len(first) > 2
    r = scaletrain("consolidate", str(ckpt), "--max-shard-size", "100KB", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    r = scaletrain("consolidate", str(ckpt), "--force", "--max-shard-size", "1MB", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
