"""Checkpoint costs, each as a ratio to a reference measured in the same run on the same disk.

    python bench/bench_checkpoint.py [--world 2] [--n-layer 6] [--n-embd 512] [--rounds 3]
                                     [--zero3-layer 12] [--zero3-embd 1024] [--skip-zero3] [--dir DIR]

throughput  a sharded (DCP) DDP checkpoint through CheckpointManager.save (write + sha256 + fsync +
            rename), and engine.load_checkpoint, against `dd`-style raw writes of the same number of
            bytes (each rank writes its share in 8 MiB blocks, then fsync) under the same folder.
async stall with checkpoint.async=true, how long save() blocks the training loop (state-dict, CPU
            staging copy, small files), as a share of a synchronous save's time (target <= 0.25);
            the tag is committed at the next save or at the end, after the write finished.
consolidate peak resident memory (ru_maxrss of the child, from wait4) of `scaletrain consolidate` on a
            ZeRO-3 checkpoint written by the harness (`backend=deepspeed backend.deepspeed.stage=3`),
            divided by the output file's size (target <= 1.5), beside DeepSpeed's own zero_to_fp32
            (get_fp32_state_dict_from_zero_checkpoint + torch.save) on the same checkpoint, and beside
            the floor of an interpreter that only imports torch and the consolidate module.

Spawns `--world` gloo processes on the CPU. Absolute numbers depend on the disk and the machine's
load; the ratios are the result. Imports: scaletrain (and deepspeed through the harness).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_STALL = 0.25
TARGET_RSS = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_write(folder: Path, nbytes: int, rank: int) -> None:
    block = os.urandom(8 << 20)
    path = folder / f"raw_{rank}.bin"
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def _engine(args: argparse.Namespace, ctx: Any, fmt: str = "sharded") -> Any:
    import torch

    from scaletrain.config import ModelConfig
    from scaletrain.engines.backends.ddp import DDPConfig
    from scaletrain.engines.base import EngineSpec
    from scaletrain.engines.torch_native import TorchNativeEngine
    from scaletrain.model.gpt import GPT

    mcfg = ModelConfig(n_layer=args.n_layer, n_head=8, n_embd=args.n_embd, block_size=64)
    spec = EngineSpec(ctx=ctx, precision="fp32", grad_accum=1, grad_clip=1.0, micro_batch_size=2,
                      model_factory=lambda: GPT(mcfg, 256), seed=0, checkpoint_format=fmt,
                      optimizer_factory=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4))
    torch.manual_seed(0)
    return TorchNativeEngine(spec, ddp=DDPConfig())


def _train_step(engine: Any) -> None:
    import torch

    from scaletrain.objective import TokenBatch, lm_loss_sum

    x = torch.randint(0, 256, (2, 64))
    loss = lm_loss_sum(engine.forward(TokenBatch(x, x)), x) / x.numel()
    engine.backward(loss)
    engine.step(1e-4)


def _timed(fn: Any, *args: Any) -> float:
    """Collective. Seconds for fn(*args) on every rank, barriers on both sides."""
    from scaletrain import dist

    dist.barrier()
    t0 = time.perf_counter()
    fn(*args)
    dist.barrier()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        queue.put((rank, True, _measure(rank, world, args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def _measure(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    from scaletrain import dist
    from scaletrain.checkpoint import layout
    from scaletrain.checkpoint.manager import CheckpointManager
    from scaletrain.config import CheckpointConfig

    ctx = dist.init(dist.current_launch(), timeout_s=600)
    root = Path(args.dir)
    engine = _engine(args, ctx)
    _train_step(engine)  # AdamW moments exist
    res: dict[str, list[float]] = {"save_s": [], "load_s": [], "raw_s": [], "stall_s": [], "async_total_s": []}
    nbytes = 0
    for r in range(args.rounds):
        sync = CheckpointManager(root / f"sync{r}", CheckpointConfig(keep_last=1), ctx)
        res["save_s"].append(_timed(sync.save, engine, 1, {"step": 1}, {}))
        tag = root / f"sync{r}" / layout.tag_name(1)
        nbytes = sum(f["size"] for f in layout.read_meta(tag)["files"].values())
        res["load_s"].append(_timed(engine.load_checkpoint, tag))
        res["raw_s"].append(_timed(_raw_write, root, nbytes // world, rank))
        asy = CheckpointManager(root / f"async{r}", CheckpointConfig(keep_last=1, async_save=True), ctx)
        t0 = time.perf_counter()
        res["stall_s"].append(_timed(asy.save, engine, 1, {"step": 1}, {}))
        _train_step(engine)  # training goes on while the shards are written
        asy.finish_pending()
        dist.barrier()
        res["async_total_s"].append(time.perf_counter() - t0)
        assert layout.read_pointer(root / f"async{r}") == layout.tag_name(1)
    engine.close()
    dist.teardown()
    return {"bytes": nbytes, **{k: statistics.median(v) for k, v in res.items()}}


def _run_ranks(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    for _ in procs:
        rank, ok, value = queue.get(timeout=1800)
        if not ok:
            raise SystemExit(f"rank {rank} failed:\n{value}")
        out[rank] = value
    for p in procs:
        p.join()
    return out[0]


def _peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Peak resident set (MiB) of one child process from wait4's rusage, and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def _zero3(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.dir) / "zero3"
    data = Path(args.dir) / "data"
    py = sys.executable
    if not (data / "meta.json").is_file():
        subprocess.run([py, "-m", "scaletrain.cli", "prepare", "--out", str(data), "--max-bytes", "200000"], check=True)
    overrides = [f"data.path={data}", f"run.out_dir={root}", f"model.n_layer={args.zero3_layer}", "model.n_head=8",
                 f"model.n_embd={args.zero3_embd}", "model.block_size=64", "train.micro_batch_size=1",
                 "train.max_steps=1", "schedule.warmup_steps=0", "train.eval_steps=0", "logging.console=false", "backend=deepspeed",
                 "backend.deepspeed.stage=3"]
    torchrun = str(Path(py).parent / "torchrun")
    r = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={args.world}", str(REPO / "launch" / "train.py"),
                        *overrides], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"building the ZeRO-3 checkpoint failed:\n{r.stderr[-3000:]}")
    tag = root / "ckpt" / "step_00000001"
    ours = Path(args.dir) / "ours.safetensors"
    theirs = Path(args.dir) / "theirs"
    floor, _ = _peak_rss_mib([py, "-c", "import torch, scaletrain.checkpoint.consolidate"])
    rss, secs = _peak_rss_mib([py, "-m", "scaletrain.cli", "consolidate", str(tag), "--out", str(ours), "--force"])
    # DeepSpeed's own helper, through its Python API: its command line always shards with huggingface_hub.
    ds_script = ("import sys, torch; from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint "
                 "as get; torch.save(get(sys.argv[1], tag='deepspeed'), sys.argv[2])")
    theirs.mkdir()
    ds_rss, ds_secs = _peak_rss_mib([py, "-c", ds_script, str(tag), str(theirs / "model.pt")])
    out_mib = ours.stat().st_size / 2**20
    ds_out = (theirs / "model.pt").stat().st_size / 2**20
    return {"output_mib": out_mib, "rss_mib": rss, "rss_ratio": rss / out_mib, "seconds": secs,
            "floor_mib": floor, "ds_rss_mib": ds_rss, "ds_rss_ratio": ds_rss / out_mib, "ds_seconds": ds_secs,
            "ds_output_mib": ds_out}


def _throughput(r: dict[str, Any]) -> dict[str, Any]:
    mib = r["bytes"] / 2**20
    return {
            "checkpoint_mib": round(mib, 1),
            "save_mib_s": round(mib / r["save_s"], 1), "load_mib_s": round(mib / r["load_s"], 1),
            "raw_write_mib_s": round(mib / r["raw_s"], 1),
            "save_vs_raw": round(r["raw_s"] / r["save_s"], 3), "load_vs_raw": round(r["raw_s"] / r["load_s"], 3),
            "sync_save_s": round(r["save_s"], 3), "async_stall_s": round(r["stall_s"], 3),
            "async_stall_share": round(r["stall_s"] / r["save_s"], 3), "async_stall_target": TARGET_STALL,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--zero3-layer", type=int, default=12)
    p.add_argument("--zero3-embd", type=int, default=1024)
    p.add_argument("--skip-zero3", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--dir", help="folder on the disk to measure (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        args.dir = tmp
        report: dict[str, Any] = {}
        if not args.skip_throughput:
            report.update(_throughput(_run_ranks(args)))
            print(json.dumps(report, indent=2), flush=True)
        if not args.skip_zero3:
            z = _zero3(args)
            report.update({f"zero3_{k}": round(v, 3) for k, v in z.items()}, zero3_rss_target=TARGET_RSS)
            print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
