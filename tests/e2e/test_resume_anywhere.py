"""Resume anywhere, as a user runs it: train 10 steps on one backend, resume on another (and another
world size) to step 20, and follow the uninterrupted 20-step run; `scaletrain convert` ahead of time
gives the same run as converting at start-up. fp32, fixed global batch, 2 CPU processes.

Pairs (default suite): DDP -> ZeRO-3, ZeRO-2 -> FSDP, FSDP (full format) -> ZeRO-1 on one process.
The full ordered matrix is `-m slow`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import losses, scaletrain, tiny_overrides, train

from scaletrain.checkpoint import layout

pytestmark = pytest.mark.timeout(1800)

STEPS = 20
GLOBAL = 8  # train.global_batch_size: the same data order on 1 or 2 processes
SPECS = {
    "ddp": {"backend": "ddp"},
    "fsdp": {"backend": "fsdp"},
    "fsdp-full": {"backend": "fsdp", "checkpoint.format": "full"},
    "tp2": {"backend": "fsdp", "backend.tp_size": 2},
    "zero1": {"backend": "deepspeed", "backend.deepspeed.stage": 1},
    "zero2": {"backend": "deepspeed", "backend.deepspeed.stage": 2},
    "zero3": {"backend": "deepspeed", "backend.deepspeed.stage": 3},
}


def _over(data: Path, out: Path, name: str, nproc: int, **extra) -> list[str]:
    micro = GLOBAL // nproc if name != "tp2" else GLOBAL  # tp:2 on 2 processes is one data-parallel rank
    return tiny_overrides(data, out, **{"train.max_steps": STEPS, "checkpoint.every": 10,
                                        "train.global_batch_size": GLOBAL, "train.micro_batch_size": micro, "optim.lr": 1e-2,
                                        **SPECS[name], **extra})


def _straight(data: Path, out: Path, name: str) -> Path:
    train(_over(data, out, name, 2), timeout=400)
    return out


def _resume(data: Path, src: Path, out: Path, name: str, nproc: int, tag: Path | None = None,
            converting: bool = True) -> dict[int, float]:
    """A new run folder that resumes from `tag` (default: the source's step-10 tag) on backend `name`;
    `converting`: the resume takes the portable route and says so."""
    tag = tag or src / "ckpt" / layout.tag_name(10)
    r = train(_over(data, out, name, nproc, **{"checkpoint.resume": tag}), nproc=nproc, timeout=400)
    assert ("resumed from a" in r.stdout + r.stderr) == converting, r.stderr[-2000:]
    got = losses(out)
    assert sorted(got) == list(range(11, STEPS + 1)), sorted(got)
    return got


def _close(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    for s in range(11, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=rel), (s, got[s], want[s])


@pytest.fixture(scope="module")
def straight(tiny_data: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anywhere")
    return {name: _straight(tiny_data, root / name, name) for name in ("ddp", "zero2", "fsdp-full")}


@pytest.fixture(scope="module")
def ddp_to_zero3(straight: dict[str, Path], tiny_data: Path, tmp_path_factory) -> dict[int, float]:
    return _resume(tiny_data, straight["ddp"], tmp_path_factory.mktemp("d2z3") / "r", "zero3", 2)


def test_ddp_to_zero3(straight: dict[str, Path], ddp_to_zero3: dict[int, float]):
    _close(ddp_to_zero3, losses(straight["ddp"]), 1e-3)


def test_zero2_to_fsdp(straight: dict[str, Path], tiny_data: Path, tmp_path: Path):
    got = _resume(tiny_data, straight["zero2"], tmp_path / "r", "fsdp", 2)
    _close(got, losses(straight["zero2"]), 1e-4)


def _weights_only(tag: Path, out: Path) -> Path:
    """A copy of a full-format tag whose optimizer state is dropped (a fresh AdamW), checksums renewed."""
    shutil.copytree(tag, out)
    optim = torch.load(out / "optim.pt", weights_only=True)
    torch.save({"state": {}, "param_groups": optim["param_groups"]}, out / "optim.pt")
    meta = layout.read_meta(out)
    names = sorted(meta["files"])
    layout.write_meta(out, {k: v for k, v in meta.items() if k not in ("files", "format_version")},
                      layout.digest_files(out, names))
    return out


def test_fsdp_to_zero1_on_one_process_carries_the_optimizer(straight: dict[str, Path], tiny_data: Path,
                                                             tmp_path: Path):
    """World 2 -> 1; and the same resume from the weights alone (fresh AdamW) departs from the straight
    run by more than 1e-2 somewhere: the moments made the trip."""
    want = losses(straight["fsdp-full"])
    got = _resume(tiny_data, straight["fsdp-full"], tmp_path / "r", "zero1", 1)
    _close(got, want, 1e-3)
    bare = _weights_only(straight["fsdp-full"] / "ckpt" / layout.tag_name(10), tmp_path / "bare" / "step_00000010")
    fresh = _resume(tiny_data, straight["fsdp-full"], tmp_path / "w", "zero1", 1, tag=bare)
    assert max(abs(fresh[s] - want[s]) / abs(want[s]) for s in range(11, STEPS + 1)) > 1e-2


def test_convert_resumes_like_conversion_at_start_up(straight: dict[str, Path], ddp_to_zero3: dict[int, float],
                                                     tiny_data: Path, tmp_path: Path):
    tag = straight["ddp"] / "ckpt" / layout.tag_name(10)
    r = scaletrain("convert", str(tag), "--to", "deepspeed:3", "--world", "2", "--out", str(tmp_path / "conv"),
                   timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    converted = tmp_path / "conv" / layout.tag_name(10)
    meta = layout.read_meta(converted)
    assert meta["backend_spec"] == "deepspeed:3" and meta["world_size"] == 2 and meta["format"] == "deepspeed"
    got = _resume(tiny_data, straight["ddp"], tmp_path / "r", "zero3", 2, tag=tmp_path / "conv", converting=False)
    assert got == ddp_to_zero3


def test_convert_refuses_a_damaged_source(straight: dict[str, Path], tmp_path: Path):
    tag = shutil.copytree(straight["zero2"] / "ckpt" / layout.tag_name(10), tmp_path / "step_00000010")
    victim = sorted((tag / "deepspeed").glob("*optim_states.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = scaletrain("convert", str(tag), "--to", "fsdp", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "checksum mismatch" in r.stderr and "damaged" in r.stderr, r.stderr
    assert not (tmp_path / "out" / layout.tag_name(10)).exists()


# ------------------------------------------------------------------------------------------- the matrix

MATRIX = ["ddp", "fsdp", "zero1", "zero2", "zero3", "tp2"]


@pytest.mark.slow
@pytest.mark.parametrize("target", MATRIX)
@pytest.mark.parametrize("source", MATRIX)
def test_matrix(tiny_data: Path, tmp_path_factory, source: str, target: str):
    if source == target:
        pytest.skip("same backend: the native resume, tested elsewhere")
    root = tmp_path_factory.getbasetemp() / "matrix"
    src = root / source
    if not (src / "ckpt" / layout.tag_name(STEPS)).is_dir():
        shutil.rmtree(src, ignore_errors=True)
        _straight(tiny_data, src, source)
    native = {source, target} <= {"ddp", "fsdp", "tp2"}  # DCP reshards between these natively
    got = _resume(tiny_data, src, tmp_path_factory.mktemp(f"{source}-{target}") / "r", target, 2, converting=not native)
    # tp:2 sums its matmuls in another order, ZeRO-3 its partitions: 1e-3 as for world-size changes.
    rel = 1e-3 if {"tp2", "zero3"} & {source, target} else 1e-4
    _close(got, losses(src), rel)
