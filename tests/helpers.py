"""What the tests share: running the real CLI under torchrun with a hard timeout, tiny configs,
reading metrics, and an in-process 2-rank spawner. Every multi-process helper kills its whole
process group on timeout, so a hang becomes a failure, never a stuck suite."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data_dir: Path, out_dir: Path, **extra: Any) -> list[str]:
    """A model and batch small enough that a 2-process step takes milliseconds on 2 CPU cores."""
    base = {
        "data.path": data_dir, "run.out_dir": out_dir, "model.n_layer": 2, "model.n_head": 2,
        "model.n_embd": 32, "model.block_size": 32, "train.micro_batch_size": 4, "train.max_steps": 6,
        "train.log_every": 1, "train.eval_every": 0, "train.eval_steps": 2, "schedule.warmup_steps": 2,
        "schedule.min_lr": 1e-5, "checkpoint.every": 0, "logging.console": False,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in base.items()]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "scaletrain-torch-extensions"))
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group, and every descendant: torchrun starts its workers in
    sessions of their own, so killing the group alone would leave them running."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_cmd(cmd: Sequence[str], *, timeout: float = 240, cwd: Path | None = None, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail loudly."""
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd or REPO, env=env or child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-5000:]}")
    return result


def train_cmd(overrides: Sequence[str], nproc: int = 2, extra_args: Sequence[str] = ()) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, *extra_args, *overrides]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", TRAIN, *extra_args, *overrides]


def train(overrides: Sequence[str], nproc: int = 2, *, timeout: float = 240, check: bool = True,
          extra_args: Sequence[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd(train_cmd(overrides, nproc, extra_args), timeout=timeout, check=check, env=env)


def scaletrain(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "scaletrain.cli", *args], timeout=timeout, check=check)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------
# In-process spawner for tests that call library functions on 2 ranks.


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def spawn(fn: Callable, world: int = 2, args: tuple = (), timeout: float = 120) -> list[Any]:
    """Run fn(rank, world, *args) on `world` fresh processes; results by rank, or the first traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
