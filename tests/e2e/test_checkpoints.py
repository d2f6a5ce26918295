"""Checkpoints as a user meets them: kill -9 at any moment, damaged files, a full or read-only disk,
async saves, `scaletrain inspect` and `scaletrain consolidate` for every backend, `model.init_from`."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import child_env, losses, read_metrics, scaletrain, tiny_overrides, train, train_cmd

from scaletrain.checkpoint import layout

BACKENDS = {  # name -> overrides; the DeepSpeed ones write `<tag>/deepspeed/`
    "ddp-full": {"checkpoint.format": "full"},
    "ddp-sharded": {"checkpoint.format": "sharded"},
    "fsdp-full": {"backend": "fsdp", "checkpoint.format": "full"},
    "fsdp-sharded": {"backend": "fsdp", "checkpoint.format": "sharded"},
    "zero1": {"backend": "deepspeed", "backend.deepspeed.stage": 1},
    "zero2": {"backend": "deepspeed", "backend.deepspeed.stage": 2},
    "zero3": {"backend": "deepspeed", "backend.deepspeed.stage": 3},
    "zero3-offload": {"backend": "deepspeed", "backend.deepspeed.stage": 3, "backend.deepspeed.offload_optimizer": True,
                      "backend.deepspeed.offload_param": True},
}


def backend_param(name: str, *marks):
    return pytest.param(name, marks=list(marks), id=name)


def verify_tag(tag_dir: Path) -> layout.TagInfo:
    info = layout.check_tag(tag_dir)
    if info.meta is None:
        return info
    return layout.check_tag(tag_dir, digests=layout.digest_files(tag_dir, sorted(info.meta["files"])))


def output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- crash safety


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers together, like a node dying. (torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone would leave the workers running.)"""
    pids = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _wait_for_a_new_step(run: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Until the run logs a step past those logged before it started (so each kill hits training)."""
    metrics = run / "metrics.jsonl"
    before = len(read_metrics(run)) if metrics.is_file() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) > before:
            return
        time.sleep(0.05)
    _kill_all(proc)
    raise AssertionError(f"the run logged no new step within {timeout}s (exit {proc.poll()})")


def _kill_loop(tiny_data: Path, run: Path, kills: int, seed: int) -> int:
    """Start a long 2-process run, SIGKILL its whole process group at a random moment, check, repeat."""
    rng = random.Random(seed)
    o = tiny_overrides(tiny_data, run, **{"train.max_steps": 10_000, "checkpoint.every": 1, "checkpoint.keep_last": 2,
                                          "train.eval_steps": 0})
    done = 0
    while done < kills:
        proc = subprocess.Popen(train_cmd(o), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
                                start_new_session=True)
        _wait_for_a_new_step(run, proc)
        time.sleep(rng.uniform(0.0, 1.0))  # mid-step, mid-save, mid-commit: wherever it falls
        _kill_all(proc)
        done += 1
        latest = layout.read_pointer(run / "ckpt")
        if latest is not None:
            info = verify_tag(layout.safe_child(run / "ckpt", latest))
            assert info.intact, f"after kill {done}, latest {latest} is damaged: {info.problems}"
    latest = layout.read_pointer(run / "ckpt")
    assert latest is not None and layout.tag_step(latest) >= kills // 2, f"too little progress: {latest}"
    return layout.tag_step(latest)


def _finish_after_kills(tiny_data: Path, run: Path, last_step: int) -> None:
    final = last_step + 3
    o = tiny_overrides(tiny_data, run, **{"train.max_steps": final, "checkpoint.every": 1, "checkpoint.keep_last": 2})
    train(o, timeout=180)
    assert layout.read_pointer(run / "ckpt") == layout.tag_name(final)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, final + 1)), "every step logged once, none lost or repeated"


def test_sigkill_at_random_moments_keeps_latest_intact(tiny_data: Path, tmp_path: Path):
    """10 kills of the whole process group (checkpoint.every=1), then the run reaches its last step."""
    last = _kill_loop(tiny_data, tmp_path / "r", kills=10, seed=1234)
    _finish_after_kills(tiny_data, tmp_path / "r", last)


@pytest.mark.slow
def test_sigkill_many_times(tiny_data: Path, tmp_path: Path):
    last = _kill_loop(tiny_data, tmp_path / "r", kills=40, seed=99)
    _finish_after_kills(tiny_data, tmp_path / "r", last)


# ------------------------------------------------------------------------------------------- damage


def test_damaged_shards_are_found_by_verify_and_resume_falls_back(tiny_data: Path, tmp_path: Path):
    """A truncated shard (step 6) and a flipped byte (step 4): `inspect --verify` names both files and exits 1;
    resume skips both tags, says so, and goes on from step 2."""
    run = tmp_path / "r"
    o = tiny_overrides(tiny_data, run, **{"train.max_steps": 6, "checkpoint.every": 2})
    train(o)
    ckpt = run / "ckpt"
    truncated = sorted((ckpt / "step_00000006" / "dcp").glob("*.distcp"))[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = sorted((ckpt / "step_00000004" / "dcp").glob("*.distcp"))[-1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    r = scaletrain("inspect", str(ckpt), "--verify")
    assert r.returncode == 1, output(r)
    assert f"step_00000006: dcp/{truncated.name}: " in r.stdout and "expected" in r.stdout
    assert f"step_00000004: dcp/{flipped.name}: checksum mismatch" in r.stdout
    assert "damaged or incomplete: step_00000004, step_00000006" in r.stderr
    assert scaletrain("inspect", str(ckpt)).returncode == 0  # without --verify: a table, exit 0
    r = train(o, timeout=180)
    assert "latest names step_00000006, which is damaged or incomplete; resuming from step_00000002" in output(r)
    assert [s["step"] for s in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert scaletrain("inspect", str(ckpt), "--verify").returncode == 0  # steps 4 and 6 were written anew


def test_latest_and_tags_cannot_point_outside(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    o = tiny_overrides(tiny_data, run, **{"train.max_steps": 2})
    train(o, nproc=1)
    ckpt = run / "ckpt"
    (ckpt / "latest").write_text("../x\n")
    r = train(o, nproc=1, check=False, timeout=120)
    assert r.returncode == 2 and "is not a plain name" in r.stderr, output(r)
    outside = tmp_path / "outside"
    os.rename(ckpt / "step_00000002", outside)
    (ckpt / "step_00000002").symlink_to(outside)
    (ckpt / "latest").write_text("step_00000002\n")
    r = train(o, nproc=2, check=False, timeout=120)  # torchrun reports a failed worker as exit 1
    assert r.returncode != 0 and "error: checkpoint path 'step_00000002' escapes" in r.stderr, output(r)


# ------------------------------------------------------------------------------------------- failed saves


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i: even root cannot create entries in the folder (chmod does not stop root)."""
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("on_error", ["fail", pytest.param("warn", marks=pytest.mark.slow)])  # unit-tested too
def test_save_into_read_only_dir(tiny_data: Path, tmp_path: Path, on_error: str):
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 2}))
    ckpt = run / "ckpt"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    if os.geteuid() != 0:
        ckpt.chmod(0o555)
    elif not _immutable(ckpt, True):
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        o = tiny_overrides(tiny_data, run, **{"train.max_steps": 4, "checkpoint.on_error": on_error})
        r = train(o, check=False, timeout=180)
    finally:
        _immutable(ckpt, False) if os.geteuid() == 0 else ckpt.chmod(0o755)
    if on_error == "fail":
        assert r.returncode != 0, output(r)  # 2 from each rank; torchrun itself exits 1
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert errors and "checkpoint save failed" in errors[0] and "earlier checkpoints are intact" in errors[0]
    else:
        assert r.returncode == 0 and "training goes on" in output(r), output(r)
        assert max(losses(run)) == 4
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    assert verify_tag(ckpt / "step_00000002").intact


# ------------------------------------------------------------------------------------------- async save


def test_async_save_resumes_exactly(tiny_data: Path, tmp_path: Path):
    """checkpoint.async=true: 12 straight (sync) vs 7 async + resume + 5 async give identical losses."""
    base = {"train.max_steps": 12, "checkpoint.every": 3}
    train(tiny_overrides(tiny_data, tmp_path / "sync", **base))
    o = tiny_overrides(tiny_data, tmp_path / "async", **base, **{"checkpoint.async": True})
    train([*o, "train.stop_at=7"])
    assert layout.read_pointer(tmp_path / "async" / "ckpt") == "step_00000007"
    train(o)
    a, b = losses(tmp_path / "sync"), losses(tmp_path / "async")
    assert a == b
    for tag in layout.tags(tmp_path / "async" / "ckpt"):
        assert verify_tag(tag).intact


# ------------------------------------------------------------------------------------------- consolidate


def val_loss_of(weights: Path, run: Path, dtype: torch.dtype = torch.float32, world: int = 2) -> float:
    """The loop's evaluation, in one process: every rank's validation batches through the built-in GPT."""
    from scaletrain.config import load_config
    from scaletrain.data.format import read_meta
    from scaletrain.data.tokens import Batches, BatchPlan
    from scaletrain.model.build import build_model
    from scaletrain.model.weights import complete_tied, load_weights_file
    from scaletrain.objective import lm_loss_sum

    cfg = load_config(run / "config.json", [])
    meta = read_meta(cfg.data.path)
    model = build_model(cfg.model, meta.vocab_size)
    model.load_state_dict(complete_tied(model, load_weights_file(weights)), strict=True)
    model.to(dtype).eval()
    total, count = 0.0, 0
    for rank in range(world):
        batches = Batches(cfg.data.path, meta, block_size=cfg.model.block_size,
                          plan=BatchPlan(cfg.train.micro_batch_size, 1, world), rank=rank, seed=cfg.run.seed)
        for i in range(cfg.train.eval_steps):
            x, y = batches.val_batch(i)
            with torch.no_grad():
                total += float(lm_loss_sum(model(x), y))
            count += y.numel()
    return total / count


def final_val_loss(run: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]


SLOW_CONSOLIDATE = {"zero1", "fsdp-full", "zero3-offload"}  # same readers as zero2 / ddp-full / zero3


@pytest.mark.parametrize("name", [backend_param(n, *([pytest.mark.slow] if n in SLOW_CONSOLIDATE else []))
                                  for n in BACKENDS])
def test_consolidate_gives_the_live_models_val_loss(tiny_data: Path, tmp_path: Path, name: str):
    """fp32: the consolidated file's validation loss equals the one the run logged at its last step (1e-5)."""
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 4, **BACKENDS[name]}), timeout=300)
    r = scaletrain("consolidate", str(run / "ckpt"))
    assert r.returncode == 0, output(r)
    out = run / "consolidated" / "step_00000004.safetensors"
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "wte.weight" in keys  # tied: stored once
    assert not any(k.startswith(("module.", "_orig_mod.", "_fsdp_wrapped_module.")) for k in keys)
    assert val_loss_of(out, run) == pytest.approx(final_val_loss(run), rel=1e-5, abs=1e-6)
    r = scaletrain("consolidate", str(run / "ckpt"))
    assert r.returncode == 2 and "--force" in r.stderr  # never overwrites by accident


def test_consolidate_formats_shards_and_bf16(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 2}))
    expected = final_val_loss(run)
    shards = tmp_path / "shards"
    r = scaletrain("consolidate", str(run / "ckpt"), "--max-shard-size", "40KB", "--out", str(shards))
    assert r.returncode == 0, output(r)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert val_loss_of(shards / "model.safetensors.index.json", run) == pytest.approx(expected, rel=1e-5)
    r = scaletrain("consolidate", str(run / "ckpt"), "--format", "pt", "--dtype", "bf16", "--out", str(tmp_path / "w.pt"))
    assert r.returncode == 0, output(r)
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    # bf16 weights: the loss moves by about bf16's relative precision (2^-8) times a few.
    assert val_loss_of(tmp_path / "w.pt", run) == pytest.approx(expected, rel=2e-2)


# ------------------------------------------------------------------------------------------- init_from


INIT_CASES = [backend_param("ddp-sharded"), backend_param("zero2")]


@pytest.mark.parametrize("source", INIT_CASES)
def test_init_from_consolidated_starts_where_the_source_ended(tiny_data: Path, tmp_path: Path, source: str):
    """Claim: a new run started from the consolidated file, trained one step at lr=1e-12 (so its weights move
    by ~1e-12) and evaluated after that step, logs the source's final val_loss within 1e-5 relative. The
    new run uses DDP after a DDP source and FSDP after a ZeRO-2 source (when the FSDP engine is there)."""
    src = tmp_path / "src"
    train(tiny_overrides(tiny_data, src, **{"train.max_steps": 4, **BACKENDS[source]}), timeout=300)
    assert scaletrain("consolidate", str(src / "ckpt"), "--out", str(tmp_path / "w.safetensors")).returncode == 0
    target = {"backend": "fsdp"} if source == "zero2" else {}
    new = tiny_overrides(tiny_data, tmp_path / "new", **{"train.max_steps": 1, "optim.lr": 1e-12, "schedule.warmup_steps": 0,
                                                        "schedule.min_lr": 0.0, "model.init_from": tmp_path / "w.safetensors",
                                                        **target})
    train(new, timeout=300)
    assert final_val_loss(tmp_path / "new") == pytest.approx(final_val_loss(src), rel=1e-5)
