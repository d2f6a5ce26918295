"""DeepSpeed ZeRO as a user runs it: the `deepspeed` launcher with `--ds`, torchrun with `backend=deepspeed`.

Two CPU processes over gloo (DeepSpeed picks its CPU accelerator by itself). The straight 20-step runs
are shared by the parity, layout, resume and world-size tests, so each costs one run at most.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import (
    BIN,
    REPO,
    TRAIN,
    child_env,
    free_port,
    losses,
    read_metrics,
    run_cmd,
    spawn,
    tiny_overrides,
    train,
)

ZERO = REPO / "ds_configs"
STEPS = 20
# fp32 on one machine: ZeRO's partitioned reductions sum in another order than DDP's buckets. Measured
# differences are below 1e-6 relative; 1e-5 leaves room for another BLAS.
PARITY_REL = 1e-5
# DeepSpeed JIT-compiles its CPU ops into the shared TORCH_EXTENSIONS_DIR the first time (minutes on a
# busy 2-core machine); a build killed by a run's timeout would leave a lock that stalls later builds.
pytestmark = pytest.mark.timeout(1800)


def build_op(builder: str) -> None:
    """Compile a DeepSpeed op once, in its own process, with room for a slow first build."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            f"get_accelerator().create_op_builder({builder!r}).load()")
    run_cmd([sys.executable, "-c", code], timeout=1500, check=True)


@pytest.fixture(scope="module", autouse=True)
def _shm_comm_op() -> None:
    build_op("ShareMemCommBuilder")  # every DeepSpeed process group loads it


def ds_launch(overrides: list[str], ds_file: Path, *, timeout: float = 300) -> None:
    """`deepspeed --num_gpus 2 launch/train.py --ds FILE ...`: with the CPU accelerator --num_gpus is the
    process count (without it the launcher counts NUMA nodes)."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--ds", str(ds_file), *overrides]
    run_cmd(cmd, timeout=timeout, check=True)


def _run(out: Path, data: Path, *extra: str, ds: Path | None = None, nproc: int = 2, **over) -> Path:
    o = tiny_overrides(data, out, **{"train.max_steps": STEPS, "checkpoint.every": 10, **over})
    train([*o, *extra], nproc=nproc, extra_args=["--ds", str(ds)] if ds else (), timeout=300)
    return out


@pytest.fixture(scope="module")
def straight(tiny_data: Path, tmp_path_factory) -> dict[str, Path]:
    """20 fp32 steps each: DDP, ZeRO-1 and ZeRO-3 through torchrun, ZeRO-2 through the deepspeed launcher."""
    root = tmp_path_factory.mktemp("ds_straight")
    runs = {"ddp": _run(root / "ddp", tiny_data),
            "zero1": _run(root / "zero1", tiny_data, "backend=deepspeed", "backend.deepspeed.stage=1"),
            "zero3": _run(root / "zero3", tiny_data, "backend=deepspeed", "backend.deepspeed.stage=3")}
    ds_launch(tiny_overrides(tiny_data, root / "zero2", **{"train.max_steps": STEPS, "checkpoint.every": 10}),
              ZERO / "zero2.json")
    runs["zero2"] = root / "zero2"
    return runs


def test_zero_stages_match_ddp(straight: dict[str, Path]):
    ddp = read_metrics(straight["ddp"])
    for stage in ("zero1", "zero2", "zero3"):
        recs = read_metrics(straight[stage])
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), stage
        for x, y in zip(recs, ddp, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=PARITY_REL), (stage, x["step"])
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=PARITY_REL), (stage, x["step"])
            assert x["lr"] == y["lr"]  # the schedule is the harness's, not DeepSpeed's


def test_checkpoint_holds_deepspeed_files_inside_the_tag(straight: dict[str, Path]):
    ckpt = straight["zero2"] / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000020"
    tag = ckpt / "step_00000020"
    meta = json.loads((tag / "meta.json").read_text())
    assert meta["backend"] == "deepspeed" and meta["world_size"] == 2 and meta["format"] == "deepspeed"
    names = set(meta["files"])
    assert "deepspeed/mp_rank_00_model_states.pt" in names
    assert {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    assert not (tag / "deepspeed" / "latest").exists() and not (tag / "latest").exists()


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_exact_resume(straight: dict[str, Path], tiny_data: Path, tmp_path: Path, stage: int):
    """Stop at 10 (train.stop_at), resume to 20: every logged number equals the straight run's."""
    args = ("backend=deepspeed", f"backend.deepspeed.stage={stage}")
    _run(tmp_path / "b", tiny_data, *args, **{"train.stop_at": 10})
    _run(tmp_path / "b", tiny_data, *args)
    a, b = read_metrics(straight[f"zero{stage}"]), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"])


def _resume_on_one_process(src: Path, tiny_data: Path, out: Path, stage: int) -> dict[int, float]:
    """The run folder continued in place on 1 process (a copy, so the fixture stays as it is; the copy
    keeps the folder's run id, so its tags count as its own and may be converted)."""
    shutil.copytree(src, out)
    # Same global batch (1 x 8 instead of 2 x 4): the data order is the same, so losses must follow.
    _run(out, tiny_data, "backend=deepspeed", f"backend.deepspeed.stage={stage}", nproc=1,
         **{"train.micro_batch_size": 8, "checkpoint.resume": out / "ckpt" / "step_00000010"})
    return {s: v for s, v in losses(out).items() if s > 10}


def test_resume_on_another_world_size_zero2(straight: dict[str, Path], tiny_data: Path, tmp_path: Path):
    """2 -> 1 process through DeepSpeed's universal checkpoint, converted on the fly next to the tag."""
    got = _resume_on_one_process(straight["zero2"], tiny_data, tmp_path / "w", 2)
    want = losses(straight["zero2"])
    assert sorted(got) == list(range(11, STEPS + 1))
    for s in range(11, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5), s
    converted = tmp_path / "w" / "ckpt" / "step_00000010"
    assert (converted / "deepspeed_universal" / "deepspeed" / "zero").is_dir()
    assert (converted / "deepspeed_universal.manifest").is_file()


@pytest.mark.slow
def test_resume_on_another_world_size_zero3(straight: dict[str, Path], tiny_data: Path, tmp_path: Path):
    got = _resume_on_one_process(straight["zero3"], tiny_data, tmp_path / "w", 3)
    want = losses(straight["zero3"])
    assert got[11] == pytest.approx(want[11], rel=1e-6)
    for s in range(12, STEPS + 1):  # measured: within 1e-4 relative (see docs/deepspeed.md)
        assert got[s] == pytest.approx(want[s], rel=1e-3), s


def test_nonfinite_step_is_skipped(tiny_data: Path, tmp_path: Path):
    """A NaN forward on step 3: DeepSpeed sees a non-finite global norm on every rank and skips it."""
    env = child_env(PYTHONPATH=str(REPO / "tests"), NAN_STEPS="3")
    o = tiny_overrides(tiny_data, tmp_path / "n", **{"model.factory": "models:nan_lm", "backend": "deepspeed"})
    train(o, nproc=2, env=env, timeout=300)
    recs = read_metrics(tmp_path / "n")
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False, False, False]


# ---------------------------------------------------------------------------------------------
# full_state_dict, in process on 2 ranks


def _full_state(rank: int, world: int) -> dict:
    """ZeRO-3 fp32 and ZeRO-2 bf16 on one process group: names and values right after init."""
    import torch

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.engines.base import EngineSpec
    from scaletrain.engines.registry import build_engine
    from scaletrain.model.build import build_model
    from scaletrain.model.materialize import build_initialized
    from scaletrain.optim import build_adamw

    ctx = dist.init(dist.current_launch(), timeout_s=120)
    out = {}
    try:
        for stage, precision in ((3, "fp32"), (2, "bf16")):
            cfg = load_config(None, ["backend=deepspeed", f"backend.deepspeed.stage={stage}", f"precision={precision}",
                                     "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8"])
            # The harness's own build (meta + materialise from (seed, name)), as DDP and ZeRO-1/2 make it.
            reference = build_initialized(lambda cfg=cfg: build_model(cfg.model, 64), device=torch.device("cpu"),
                                          seed=0).state_dict()
            spec = EngineSpec(ctx=ctx, precision=cfg.precision, grad_accum=1, grad_clip=1.0, micro_batch_size=2,
                              model_factory=lambda cfg=cfg: build_model(cfg.model, 64),
                              optimizer_factory=lambda m, cfg=cfg: build_adamw(m, cfg.optim, device_type="cpu"),
                              seed=0)
            torch.manual_seed(0)
            engine = build_engine(spec, cfg)
            full = engine.full_state_dict()
            engine.close()
            # DeepSpeed makes its bf16 run's fp32 master copy from the bf16-cast module: compare to that.
            want = {k: v.to(torch.bfloat16).float() if precision == "bf16" else v for k, v in reference.items()}
            out[f"{stage}-{precision}"] = full == {} if rank else {
                "same": sorted(full) == sorted(want) and all(torch.equal(full[k], want[k]) for k in want),
                "dtypes": sorted({str(v.dtype) for v in full.values()}),
            }
    finally:
        dist.teardown()
    return out


def test_full_state_dict_is_fp32_with_plain_names():
    """ZeRO-3 (built under zero.Init) gathers its partitions and equals the DDP build bitwise; ZeRO-2 bf16
    returns its fp32 master copy. Rank 0 only."""
    rank0, rank1 = spawn(_full_state, timeout=300)
    for case, got in rank0.items():
        assert got["same"] and got["dtypes"] == ["torch.float32"], (case, got)
    assert all(rank1.values()), rank1


# ---------------------------------------------------------------------------------------------
# Slower: bf16 on every stage, offload (compiles DeepSpeedCPUAdam once, about 90 s)


@pytest.mark.slow
def test_bf16_every_stage(tiny_data: Path, tmp_path: Path):
    for stage in (1, 2, 3):
        out = tmp_path / f"z{stage}"
        _run(out, tiny_data, "backend=deepspeed", f"backend.deepspeed.stage={stage}", "precision=bf16",
             **{"train.max_steps": 2, "checkpoint.every": 0})
        recs = read_metrics(out)
        assert len(recs) == 2 and all(not r.get("skipped") for r in recs)
        assert recs[0]["loss"] == pytest.approx(5.45, rel=0.05)  # byte vocab: ln(256) = 5.55 at init


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_offload.json", "zero3_offload.json"])
def test_offload_trains_and_resumes_exactly(tiny_data: Path, tmp_path: Path, name: str):
    build_op("CPUAdamBuilder")  # DeepSpeedCPUAdam: about 90 s the first time, then cached
    over = {"train.max_steps": 8, "checkpoint.every": 4}
    _run(tmp_path / "a", tiny_data, ds=ZERO / name, **over)
    _run(tmp_path / "b", tiny_data, ds=ZERO / name, **over, **{"train.stop_at": 4})
    _run(tmp_path / "b", tiny_data, ds=ZERO / name, **over)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9)) and a == b

