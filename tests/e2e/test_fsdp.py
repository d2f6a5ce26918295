"""backend=fsdp as a user runs it: torchrun launch/train.py on 2 gloo processes, fp32 unless stated.

Tolerances: FSDP and DDP sum the same fp32 numbers in a different order (reduce-scatter of shards
vs bucketed all-reduce), so they agree to 1e-5 relative, not bit for bit. Resuming the same world
size is exact. Resuming on another world size changes the reduction order again: 1e-4 relative.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, losses, read_metrics, tiny_overrides, train

FSDP = {"backend": "fsdp"}


def fsdp(data: Path, out: Path, **extra) -> list[str]:
    return tiny_overrides(data, out, **{**FSDP, **extra})


def assert_close(got: list[dict], want: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rel), (g, w)


def test_loss_and_grad_norm_match_ddp(tiny_data: Path, tmp_path: Path):
    """10 steps, 2 micro-steps each (so gradient sync is off between them): FSDP == DDP to 1e-5."""
    extra = {"train.max_steps": 10, "train.grad_accum": 2, "train.grad_clip": 0.5}
    train(tiny_overrides(tiny_data, tmp_path / "ddp", **extra))
    train(fsdp(tiny_data, tmp_path / "fsdp", **extra))
    assert_close(read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp"), rel=1e-5)


def test_exact_resume_sharded(tiny_data: Path, tmp_path: Path):
    """20 steps straight vs stop_at=10 + resume (DCP shards): steps 11-20 identical."""
    extra = {"train.max_steps": 20, "checkpoint.every": 10}
    train(fsdp(tiny_data, tmp_path / "a", **extra))
    halves = fsdp(tiny_data, tmp_path / "b", **extra)
    train([*halves, "train.stop_at=10"])
    assert (tmp_path / "b" / "ckpt" / "step_00000010" / "dcp" / ".metadata").is_file()
    train(halves)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]


def resume_copy(src: Path, dst: Path, step: int) -> str:
    """Copy a finished run and return the override that resumes the copy from its tag of `step`."""
    shutil.copytree(src, dst)
    return f"checkpoint.resume={dst / 'ckpt' / f'step_{step:08d}'}"


def test_exact_resume_full_format(tiny_data: Path, tmp_path: Path):
    """Resume a copy of a 20-step run from its full step-10 checkpoint: steps 11-20 identical."""
    extra = {"train.max_steps": 20, "checkpoint.every": 10, "checkpoint.format": "full"}
    train(fsdp(tiny_data, tmp_path / "a", **extra))
    tag = tmp_path / "a" / "ckpt" / "step_00000010"
    keys = set(torch.load(tag / "model.pt", weights_only=True))  # plain names, as DDP writes them
    assert {"wte.weight", "blocks.0.attn.qkv.weight", "lm_head.weight"} <= keys
    train([*fsdp(tiny_data, tmp_path / "b", **extra), resume_copy(tmp_path / "a", tmp_path / "b", 10)])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]


def test_world_size_change_sharded(tiny_data: Path, tmp_path: Path):
    """A sharded checkpoint from 2 ranks resumes on 1, and one from 1 rank resumes on 2.

    The global batch is 8 sequences in every run (2 x 4, or 1 x 4 x accum 2), so the resumed runs
    follow the uninterrupted 2-rank run to 1e-4 relative (the reduction order differs)."""
    extra = {"train.max_steps": 12, "checkpoint.every": 6, "train.global_batch_size": 8}
    train(fsdp(tiny_data, tmp_path / "two", **extra))
    ref = losses(tmp_path / "two")
    train([*fsdp(tiny_data, tmp_path / "to1", **extra), resume_copy(tmp_path / "two", tmp_path / "to1", 6)], nproc=1)
    train([*fsdp(tiny_data, tmp_path / "to2", **extra), "train.stop_at=6"], nproc=1)
    train(fsdp(tiny_data, tmp_path / "to2", **extra), nproc=2)
    for run in ("to1", "to2"):
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(1, 13)), run
        for s in range(7, 13):
            assert got[s] == pytest.approx(ref[s], rel=1e-4), (run, s)


@pytest.fixture(scope="module")
def ddp_reference(tiny_data: Path, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_ref") / "run"
    train(tiny_overrides(tiny_data, out, **{"train.max_steps": 3, "checkpoint.format": "full"}))
    return read_metrics(out)


HYBRID = {"backend.fsdp.sharding": "hybrid_shard"}
SHARD_GRAD_OP = {"backend.fsdp.sharding": "shard_grad_op"}
NO_SHARD = {"backend.fsdp.sharding": "no_shard"}  # mesh (2, 1)
OFFLOAD = {"backend.fsdp.cpu_offload": True}
AC = {"backend.fsdp.activation_checkpointing": True}
# The default suite runs three pairings that cover every option; the options one by one are slow.
STRATEGIES = {
    "hybrid_shard": HYBRID,  # shard_group_size defaults to the ranks on this host: mesh (1, 2)
    "shard_grad_op+cpu_offload": {**SHARD_GRAD_OP, **OFFLOAD},
    "no_shard+activation_checkpointing": {**NO_SHARD, **AC},
    "full_shard": {},  # also covered by test_loss_and_grad_norm_match_ddp
    "shard_grad_op": SHARD_GRAD_OP,
    "no_shard": NO_SHARD,
    "cpu_offload": OFFLOAD,
    "activation_checkpointing": AC,
    "hybrid_shard_1x2": {**HYBRID, "backend.fsdp.shard_group_size": 2},
    "hybrid_shard_2x1": {**HYBRID, "backend.fsdp.shard_group_size": 1},
}
DEFAULT_STRATEGIES = ("hybrid_shard", "shard_grad_op+cpu_offload", "no_shard+activation_checkpointing")


@pytest.mark.parametrize(
    "name", [n if n in DEFAULT_STRATEGIES else pytest.param(n, marks=pytest.mark.slow) for n in STRATEGIES]
)
def test_every_strategy_trains_like_ddp(tiny_data: Path, tmp_path: Path, ddp_reference: list[dict], name: str):
    """3 steps of each strategy give DDP's losses and grad norms (fp32, 1e-5 relative); the full
    checkpoint carries plain parameter names (no activation-checkpointing wrapper prefix)."""
    train(fsdp(tiny_data, tmp_path / "r", **{"train.max_steps": 3, "checkpoint.format": "full", **STRATEGIES[name]}))
    assert_close(read_metrics(tmp_path / "r"), ddp_reference, rel=1e-5)
    keys = set(torch.load(tmp_path / "r" / "ckpt" / "step_00000003" / "model.pt", weights_only=True))
    assert "blocks.1.mlp.fc.weight" in keys and not any("wrapped" in k or "_orig_mod" in k for k in keys)


def test_user_model_with_wrap_classes(tiny_data: Path, tmp_path: Path):
    env = child_env(PYTHONPATH=str(REPO / "tests"))
    o = fsdp(tiny_data, tmp_path / "u", **{"model.factory": "models:tiny_lm", "train.max_steps": 3,
                                           "backend.fsdp.wrap_classes": ["TinyBlock"]})
    train(o, env=env)
    recs = read_metrics(tmp_path / "u")
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)


def test_bad_wrap_class_exits_2_with_one_line(tiny_data: Path, tmp_path: Path):
    env = child_env(PYTHONPATH=str(REPO / "tests"))
    o = fsdp(tiny_data, tmp_path / "x", **{"model.factory": "models:tiny_lm", "train.max_steps": 2,
                                           "backend.fsdp.wrap_classes": ["NoSuchBlock"]})
    r = train(o, nproc=1, env=env, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: backend.fsdp.wrap_classes:"), r.stderr
    assert "TinyBlock" in r.stderr  # the message lists the model's classes


def test_bad_fsdp_settings_are_config_errors():
    """Checked in-process (the CLI turns ConfigError into one line and exit 2, see above)."""
    from scaletrain.config import load_config
    from scaletrain.engines import registry
    from scaletrain.engines.backends.fsdp import FSDPConfig
    from scaletrain.engines.parallel import dp_mesh_shape
    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"backend.fsdp.shard_group_size \(3\) must divide the data-parallel size \(4\)"):
        registry.validate(load_config(None, ["backend=fsdp", "backend.fsdp.sharding=hybrid_shard",
                                             "backend.fsdp.shard_group_size=3"]), 4)
    with pytest.raises(ConfigError, match=r"backend.fsdp.shard_group_size \(3\) must divide"):
        dp_mesh_shape(FSDPConfig(sharding="hybrid_shard", shard_group_size=3), dp_size=4, local_size=4)
    hybrid = FSDPConfig(sharding="hybrid_shard")
    assert dp_mesh_shape(hybrid, dp_size=8, local_size=4) == (2, 4)
    assert dp_mesh_shape(hybrid.model_copy(update={"shard_group_size": 2}), dp_size=8, local_size=4) == (4, 2)
    assert dp_mesh_shape(FSDPConfig(sharding="no_shard"), dp_size=8, local_size=4) == (8, 1)
    assert dp_mesh_shape(FSDPConfig(), dp_size=8, local_size=4) is None


def test_fp16_skips_an_overflow_step_and_recovers(tiny_data: Path, tmp_path: Path):
    """fp16 with the loss scaler under FSDP: at step 2 the fp16 gradients overflow (finite loss); both
    ranks skip that step (one agreed decision), the scale halves, and the next steps are applied."""
    env = child_env(PYTHONPATH=str(REPO / "tests"), FAULT_STEP="2")
    o = fsdp(tiny_data, tmp_path / "f", **{"model.factory": "fault_models:grad_spike_lm", "precision": "fp16",
                                          "train.max_steps": 4})
    train(o, env=env)
    recs = read_metrics(tmp_path / "f")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [bool(r.get("skipped")) for r in recs] == [False, True, False, False]
    assert [r["loss_scale"] for r in recs] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert all(math.isfinite(r["loss"]) for r in recs) and math.isfinite(recs[-1]["grad_norm"])
    assert recs[3]["loss"] < recs[0]["loss"]  # it trains on after the skip


def test_bf16_trains(tiny_data: Path, tmp_path: Path):
    """bf16 compute (FSDP casts parameters), fp32 master weights and reduction: finite, applied steps."""
    train(fsdp(tiny_data, tmp_path / "b", **{"precision": "bf16", "train.max_steps": 3}))
    recs = read_metrics(tmp_path / "b")
    assert len(recs) == 3 and not any(r.get("skipped") for r in recs)
    assert all(0 < r["loss"] < 10 and 0 < r["grad_norm"] < 1e3 for r in recs)


@pytest.mark.slow
def test_ddp_sharded_checkpoint_resumes_under_fsdp(tiny_data: Path, tmp_path: Path):
    """Both engines write DCP with plain names, so a DDP run can continue under FSDP (to 1e-5)."""
    extra = {"train.max_steps": 8, "checkpoint.every": 4}
    train(tiny_overrides(tiny_data, tmp_path / "ddp", **extra))
    train([*fsdp(tiny_data, tmp_path / "f", **extra), resume_copy(tmp_path / "ddp", tmp_path / "f", 4)])
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "f")
    for s in range(5, 9):
        assert b[s] == pytest.approx(a[s], rel=1e-5)
