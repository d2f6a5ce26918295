"""The distributed context: which launcher started us, process-group setup and teardown, thin collectives.

This is the only module that reads launcher environment variables (torchrun, the `deepspeed`
launcher, SLURM's srun). `detect_launch` is a pure function of an environment mapping and argv, so
every launcher is testable without starting one. Imports: torch, `scaletrain.errors`, `scaletrain.procs`
(a free port for a single-process group).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from scaletrain.errors import ConfigError, ExitCode
from scaletrain.procs import free_port

log = logging.getLogger(__name__)

# "env" is a plain env:// launch (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by hand or by a test).
Launcher = Literal["torchrun", "deepspeed", "slurm", "env", "single"]


@dataclass(frozen=True)
class LaunchInfo:
    launcher: Launcher
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


def _local_rank_arg(argv: Sequence[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return int(arg.split("=", 1)[1])
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed node list (`node[01-03,07],gpu5`) to host names, without calling scontrol."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def detect_launch(env: Mapping[str, str], argv: Sequence[str] = ()) -> LaunchInfo:
    """Who started this process, from its environment and argv. Pure: reads only what it is given."""
    arg_local_rank = _local_rank_arg(argv)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher: Launcher
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif arg_local_rank is not None:
            launcher = "deepspeed"  # its launcher passes --local_rank=N besides setting RANK
        else:
            launcher = "env"
        local_rank = int(env.get("LOCAL_RANK", arg_local_rank if arg_local_rank is not None else 0))
        return LaunchInfo(
            launcher=launcher,
            rank=int(env["RANK"]),
            local_rank=local_rank,
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
        ntasks = int(env["SLURM_NTASKS"])
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        local_ws = env.get("SLURM_NTASKS_PER_NODE", str(ntasks // max(1, len(nodes)))).split("(")[0]
        return LaunchInfo(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=ntasks,
            local_world_size=int(local_ws),
            master_addr=env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
            master_port=port,
        )
    return LaunchInfo("single", 0, arg_local_rank or 0, 1, 1, "127.0.0.1", 0)


def current_launch(argv: Sequence[str] = ()) -> LaunchInfo:
    return detect_launch(os.environ, argv)


# Launchers whose agent process is the worker's parent and whose death orphans the worker: torchrun
# starts each worker in a session of its own, so a SIGKILL of the agent (OOM killer, a scheduler
# killing the agent's group) reaches no worker, and orphans wait on the dead agent's store until
# backend.timeout_s, holding device memory and the run folder.
WATCHED_LAUNCHERS = ("torchrun", "deepspeed")
PARENT_POLL_S = 1.0


def maybe_watch_parent(launch: LaunchInfo, *, poll_s: float = PARENT_POLL_S) -> threading.Thread | None:
    """Exit this worker within about `poll_s` seconds of its launcher's death.

    A daemon thread compares os.getppid() with the parent seen at start: a reparented process has
    lost its launcher. It then exits at once with os._exit (no finalisers, no further collective),
    so a checkpoint being written stays a temporary folder and `latest` is never touched. A plain
    `python` launch is not watched: its parent is a shell the user may close on purpose (nohup)."""
    if launch.launcher not in WATCHED_LAUNCHERS:
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                log.error("rank %d: the launcher (pid %d) is gone; exiting", launch.rank, parent)
                os._exit(ExitCode.LAUNCHER_GONE)

    thread = threading.Thread(target=watch, name="scaletrain-parent-watch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class DistContext:
    """What every other module needs to know about this process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def init(launch: LaunchInfo, *, timeout_s: float = 600.0, device: str | None = None) -> DistContext:
    """Create the default process group (gloo on CPU, nccl on CUDA) and pick this rank's device.

    A single process gets a process group of one too, so every engine runs the same code paths.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if torch.cuda.device_count() == 0:
            raise ConfigError("device: CUDA was requested but no CUDA device is visible")
        dev = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        _import_before_init()
        if launch.launcher == "single":
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            # The srun and deepspeed paths may lack some variables that env:// needs.
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistContext(launch.rank, launch.local_rank, launch.world_size, dev, launch.launcher)


def _import_before_init() -> None:
    """Import what captures the default process group at import time, while there is none.

    `torch.distributed.nn.functional` (imported by FSDP, DCP's sharded tensors and DeepSpeed) declares
    `group=group.WORLD` as default arguments: imported after `init_process_group`, those defaults hold
    the default group forever, so `destroy_process_group` cannot free it and its gloo threads
    (`pt_gloo_runloop`, `gloo_tcp_loop`) are torn down during interpreter finalisation, which aborts
    the process (SIGABRT, "terminate called without an active exception") after a completed run.
    Seen with torch 2.13; importing the module first makes those defaults None.
    """
    import torch.distributed.nn  # noqa: F401


def teardown() -> list[str]:
    """Destroy every process group and let their native worker threads end before Python exits.
    Returns the names of communication threads still alive afterwards (see `native_comm_threads`).

    A process group that something still references after `destroy_process_group` is freed during
    interpreter finalisation, when tearing down gloo's worker threads aborts the process (SIGABRT,
    "terminate called without an active exception") after a run that completed. Two such references
    exist in torch 2.13: default arguments captured at import (see `_import_before_init`), and device
    meshes kept alive by torch's own caches, each holding its groups in `_pg_registry`. Dropping those
    registries, then destroying the groups, frees every group while the runtime is whole; the
    meshes left behind cannot be used for collectives any more, which is what teardown means.
    """
    import gc

    gc.collect()
    try:
        from torch.distributed.device_mesh import DeviceMesh

        for obj in gc.get_objects():
            if type(obj) is DeviceMesh:  # exact type: isinstance on every object wakes deprecated proxies
                getattr(obj, "_pg_registry", {}).clear()
    except ImportError:  # pragma: no cover (a torch without DeviceMesh)
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    return native_comm_threads()


def native_comm_threads() -> list[str]:
    """Names of this process's native gloo/NCCL threads (Linux; [] elsewhere). Non-empty after
    `teardown` means a process group is still referenced and will be torn down at exit."""
    names = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
            if "gloo" in name or "nccl" in name.lower():
                names.append(name)
    except OSError:
        return []
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Thin collectives. Every function here is collective: every rank must call it, in the same order.


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks in one collective (float64 so token counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
