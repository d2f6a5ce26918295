"""The core harness as a user runs it: torchrun / python launch/train.py on the built-in GPT, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, child_env, losses, read_metrics, scaletrain, tiny_overrides, train


def test_exact_resume_two_processes(tiny_data: Path, tmp_path: Path):
    """20 steps straight vs 10 + resume + 10 (fp32): steps 11-20 log identical losses."""
    straight = tiny_overrides(tiny_data, tmp_path / "a", **{"train.max_steps": 20, "checkpoint.every": 10})
    train(straight)
    halves = tiny_overrides(tiny_data, tmp_path / "b", **{"train.max_steps": 20, "checkpoint.every": 10})
    train([*halves, "train.stop_at=10"])
    assert (tmp_path / "b" / "ckpt" / "latest").read_text().strip() == "step_00000010"
    train(halves)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))  # every step once, none repeated after resume
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]


@pytest.mark.parametrize("fmt", ["full"])
def test_exact_resume_full_format(tiny_data: Path, tmp_path: Path, fmt: str):
    o = tiny_overrides(tiny_data, tmp_path / "a", **{"train.max_steps": 8, "checkpoint.format": fmt})
    train(o)
    p = tiny_overrides(tiny_data, tmp_path / "b", **{"train.max_steps": 8, "checkpoint.format": fmt})
    train([*p, "train.stop_at=4"])
    assert (tmp_path / "b" / "ckpt" / "step_00000004" / "model.pt").is_file()
    train(p)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]


def test_grad_accumulation_matches_one_big_batch(tiny_data: Path, tmp_path: Path):
    """4 micro-steps of 2 == 1 step of 8 on one process. Tolerance: 1e-5 relative (fp32 sum order)."""
    train(tiny_overrides(tiny_data, tmp_path / "acc", **{"train.micro_batch_size": 2, "train.grad_accum": 4}), nproc=1)
    train(tiny_overrides(tiny_data, tmp_path / "big", **{"train.micro_batch_size": 8}), nproc=1)
    acc, big = read_metrics(tmp_path / "acc"), read_metrics(tmp_path / "big")
    for x, y in zip(acc, big):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_two_processes_match_one(tiny_data: Path, tmp_path: Path):
    """2 ranks x micro 4 == 1 rank x micro 8, and global_batch_size derives the same. Tolerance 1e-5 rel."""
    train(tiny_overrides(tiny_data, tmp_path / "two", **{"train.micro_batch_size": 4}), nproc=2)
    train(tiny_overrides(tiny_data, tmp_path / "one", **{"train.micro_batch_size": 4, "train.global_batch_size": 8}),
          nproc=1)
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert len(two) == len(one) == 6
    for x, y in zip(two, one):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_quick_start_shape_eval_and_user_model(tiny_data: Path, tmp_path: Path):
    """Plain `python launch/train.py` with a user model: eval records, config.json, a checkpoint."""
    env = child_env(PYTHONPATH=str(REPO / "tests"))
    o = tiny_overrides(tiny_data, tmp_path / "u", **{"model.factory": "models:tiny_lm", "train.eval_every": 3})
    train(o, nproc=1, env=env)
    recs = read_metrics(tmp_path / "u")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "grad_norm"} <= set(r) for r in recs)
    assert "val_loss" in recs[2] and "val_loss" in recs[5]
    assert json.loads((tmp_path / "u" / "config.json").read_text())["model"]["factory"] == "models:tiny_lm"
    assert (tmp_path / "u" / "ckpt" / "latest").read_text().strip() == "step_00000006"


def test_compile_keeps_plain_names(tiny_data: Path, tmp_path: Path):
    o = tiny_overrides(tiny_data, tmp_path / "c", **{"model.compile": True, "train.max_steps": 2,
                                                      "checkpoint.format": "full"})
    train(o, nproc=1, timeout=400)
    import torch

    sd = torch.load(tmp_path / "c" / "ckpt" / "step_00000002" / "model.pt", weights_only=True)
    assert "wte.weight" in sd and not any(k.startswith(("_orig_mod.", "module.")) for k in sd)


def test_nonfinite_steps_are_skipped_then_stop(tiny_data: Path, tmp_path: Path):
    env = child_env(PYTHONPATH=str(REPO / "tests"), NAN_STEPS="3")
    o = tiny_overrides(tiny_data, tmp_path / "n", **{"model.factory": "models:nan_lm"})
    train(o, nproc=2, env=env)
    recs = read_metrics(tmp_path / "n")
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False, False, False]
    # Always NaN: after max_skipped_steps in a row the run stops, exit 2, checkpoint of step 2 untouched.
    env = child_env(PYTHONPATH=str(REPO / "tests"), NAN_STEPS="-1")
    o = tiny_overrides(tiny_data, tmp_path / "m", **{"model.factory": "models:nan_lm", "train.max_skipped_steps": 2})
    r = train(o, nproc=2, env=env, check=False)
    assert r.returncode != 0 and "non-finite steps in a row" in r.stderr
    assert not (tmp_path / "m" / "ckpt" / "latest").exists()


BAD_INPUTS = [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("model.n_head=3", "divisible"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("optim.lr=0", "optim.lr"),
    ("model.block_size=100000000", "model.block_size"),
    ("data.path=/nonexistent/data", "data.path"),
    ("train.global_batch_size=7", "train.global_batch_size (7)"),
]


@pytest.fixture(scope="module")
def existing_run(tiny_data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("existing") / "run"
    train(tiny_overrides(tiny_data, run, **{"train.max_steps": 2}), nproc=1)
    return run


@pytest.mark.parametrize(("override", "needle"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_data: Path, existing_run: Path, override, needle):
    run = existing_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = train([*tiny_overrides(tiny_data, run, **{"train.max_steps": 4}), override], nproc=2, check=False,
              timeout=120)
    assert r.returncode != 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and needle in lines[0], r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_bad_input_single_process_exit_code_is_2(tiny_data: Path, tmp_path: Path):
    r = train([*tiny_overrides(tiny_data, tmp_path / "x"), "model.n_head=3"], nproc=1, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: config:")


def test_existing_run_is_not_overwritten(tiny_data: Path, tmp_path: Path):
    o = tiny_overrides(tiny_data, tmp_path / "r", **{"train.max_steps": 2})
    train(o, nproc=1)
    r = train([*o, "checkpoint.resume=never"], nproc=1, check=False)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_config_show_and_prepare_cli(tmp_path: Path):
    r = scaletrain("config", "show", "backend=fsdp", "optim.lr=0.003")
    assert r.returncode == 0 and 'kind = "fsdp"' in r.stdout and "lr = 0.003" in r.stdout
    src = tmp_path / "t.txt"
    src.write_text("some text to tokenise\n" * 200)
    r = scaletrain("prepare", str(src), "--out", str(tmp_path / "d"))
    assert r.returncode == 0 and json.loads((tmp_path / "d" / "meta.json").read_text())["vocab_size"] == 256
    r = scaletrain("prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and r.stderr.startswith("error: prepare:")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_and_fp16_counts_skips(tiny_data: Path, tmp_path: Path, precision: str):
    """Tiny on purpose: this CPU has no bf16 matrix units. fp16 uses a gradient scaler; a NaN step is
    skipped, counted, and the scale backs off."""
    env = child_env(PYTHONPATH=str(REPO / "tests"), NAN_STEPS="2")
    o = tiny_overrides(tiny_data, tmp_path / precision, **{"precision": precision, "train.max_steps": 3,
                                                           "model.factory": "models:nan_lm"})
    train(o, nproc=1, env=env)
    recs = read_metrics(tmp_path / precision)
    assert [r.get("skipped", False) for r in recs] == [False, True, False]
    assert recs[1]["skipped_total"] == 1 and all(r["loss"] == r["loss"] for r in (recs[0], recs[2]))
    if precision == "fp16":
        assert recs[1]["loss_scale"] < recs[0]["loss_scale"]
