"""Tensor parallel as a user runs it (`backend=fsdp backend.tp_size=2`, spec `tp:2`), 2 gloo processes.

On 2 ranks tp_size=2 is tensor parallel alone (the data-parallel size is 1); on 4 ranks it is 2-way
TP x 2-way FSDP (slow). Same global batch as the DDP reference: both ranks of a TP group read the
whole global batch, so accumulation covers what the second data-parallel rank reads under DDP.
Tolerance 1e-4 relative: TP changes the summation order inside each split matrix product.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import losses, read_metrics, tiny_overrides, train

TP = {"backend": "fsdp", "backend.tp_size": 2}
SAME_BATCH = {"train.global_batch_size": 8, "train.grad_clip": 0.5}


def assert_close(got: list[dict], want: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rel), (g, w)


@pytest.fixture(scope="module")
def ddp_reference(tiny_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp") / "ddp"
    train(tiny_overrides(tiny_data, out, **{**SAME_BATCH, "train.max_steps": 10, "checkpoint.every": 5}))
    return out


def test_tp_matches_ddp_at_the_same_global_batch(tiny_data: Path, tmp_path: Path, ddp_reference: Path):
    train(tiny_overrides(tiny_data, tmp_path / "tp", **{**TP, **SAME_BATCH, "train.max_steps": 10,
                                                        "checkpoint.every": 5}))
    assert_close(read_metrics(tmp_path / "tp"), read_metrics(ddp_reference), rel=1e-4)
    meta = (tmp_path / "tp" / "ckpt" / "step_00000010" / "meta.json").read_text()
    assert '"backend_spec": "tp:2"' in meta


def test_tp_checkpoint_resumes_under_fsdp_and_ddp_checkpoint_under_tp(tiny_data: Path, tmp_path: Path,
                                                                     ddp_reference: Path):
    """DCP checkpoints reshard between layouts: a TP tag continues under plain FSDP, a DDP tag under TP;
    steps 6-10 follow the uninterrupted DDP run (1e-4, the summation order changes)."""
    extra = {**SAME_BATCH, "train.max_steps": 10, "checkpoint.every": 5}
    tp_run = tmp_path / "tp"
    train([*tiny_overrides(tiny_data, tp_run, **{**TP, **extra}), "train.stop_at=5"])
    shutil.copytree(tp_run, tmp_path / "fsdp")
    train([*tiny_overrides(tiny_data, tmp_path / "fsdp", **{**extra, "backend": "fsdp"})])
    shutil.copytree(ddp_reference, tmp_path / "ddp_to_tp")
    resume = f"checkpoint.resume={tmp_path / 'ddp_to_tp' / 'ckpt' / 'step_00000005'}"
    train([*tiny_overrides(tiny_data, tmp_path / "ddp_to_tp", **{**TP, **extra}), resume])
    want = losses(ddp_reference)
    for run in ("fsdp", "ddp_to_tp"):
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(1, 11)), run
        for s in range(6, 11):
            assert got[s] == pytest.approx(want[s], rel=1e-4), (run, s)


@pytest.mark.slow
def test_tp_times_fsdp_on_four_processes_matches_ddp(tiny_data: Path, tmp_path: Path):
    extra = {"train.global_batch_size": 16, "train.max_steps": 6, "train.grad_clip": 0.5}
    train(tiny_overrides(tiny_data, tmp_path / "ddp", **extra), nproc=4, timeout=400)
    train(tiny_overrides(tiny_data, tmp_path / "tp", **{**TP, **extra}), nproc=4, timeout=400)
    assert_close(read_metrics(tmp_path / "tp"), read_metrics(tmp_path / "ddp"), rel=1e-4)


def test_bad_tp_settings_are_config_errors():
    from scaletrain.config import load_config
    from scaletrain.engines import registry
    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backend.tp_size \(3\) must divide the world size \(2\)"):
        registry.validate(load_config(None, ["backend=fsdp", "backend.tp_size=3"]), 2)
    with pytest.raises(ConfigError, match="composes with backend=fsdp"):
        registry.validate(load_config(None, ["backend=ddp", "backend.tp_size=2"]), 2)
    with pytest.raises(ConfigError, match=r"model.n_head \(3\) must be divisible by backend.tp_size \(2\)"):
        registry.validate(load_config(None, ["backend=fsdp", "backend.tp_size=2", "model.n_head=3",
                                             "model.n_embd=48"]), 2)
    with pytest.raises(ConfigError, match="not supported with backend=deepspeed"):
        registry.validate(load_config(None, ["backend=deepspeed", "backend.tp_size=2"]), 2)
