"""How a torch-native model is parallelised: one `DeviceMesh`, then small `apply_*` functions in order.

    build_mesh        ("replicate", "shard") data-parallel dims, plus "tp" innermost when tp_size > 1
    apply_tp          column/row-parallel matrices of each block over the "tp" dim (scaletrain.engines.tensor_parallel)
    apply_ac          activation checkpointing per block (composable: parameter names stay plain)
    apply_compile     torch.compile per block, in place (no `_orig_mod.` in names)
    apply_fsdp        fully_shard per block, then the root, over the data-parallel dims
    apply_ddp         DistributedDataParallel over every rank (the replicated strategy)

Each function takes only the settings it needs, by keyword. FSDP strategies map onto FSDP2 as:

  full_shard     1-D data-parallel mesh; blocks reshard after forward (ZeRO-3)
  shard_grad_op  1-D; parameters stay gathered between forward and backward (ZeRO-2-like)
  hybrid_shard   (replicate, shard): shard within groups of `shard_group_size` ranks (default: the
                 ranks on one host), replicate across groups
  no_shard       (world, 1): every rank holds everything, gradients are all-reduced

The tensor-parallel dim is the innermost (fastest-varying) one, so the ranks of one TP group are
neighbours (one host, NVLink) and read the same micro-batch. The settings come in as the backends'
sections, read through the `DDPSettings` / `FSDPSettings` protocols. Imports: torch,
`scaletrain.dist`, `scaletrain.errors`, `scaletrain.model.build`, `scaletrain.engines.tensor_parallel`. Not: engines, loop.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from scaletrain import dist
from scaletrain.errors import ConfigError
from scaletrain.model.build import block_classes

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DDPSettings(Protocol):
    """What `apply_ddp` reads: the `backend.ddp` section (`engines.backends.ddp.DDPConfig`)."""

    bucket_cap_mb: int
    static_graph: bool


class FSDPSettings(Protocol):
    """What the FSDP functions read: the `backend.fsdp` section (`engines.backends.fsdp.FSDPConfig`)."""

    sharding: str
    shard_group_size: int | None
    cpu_offload: bool
    activation_checkpointing: bool
    wrap_classes: tuple[str, ...]
    param_dtype: str | None
    reduce_dtype: str


def local_world_size() -> int:
    """Collective. Ranks on this host, from the hosts every rank reports (launcher-independent)."""
    hosts = dist.all_gather_object(socket.gethostname())
    return hosts.count(socket.gethostname())


def dp_mesh_shape(cfg: FSDPSettings, dp_size: int, local_size: int) -> tuple[int, int] | None:
    """(replicate, shard) sizes of a 2-D data-parallel mesh, or None for a 1-D one over every dp rank."""
    if cfg.sharding == "no_shard":
        return (dp_size, 1)
    if cfg.sharding != "hybrid_shard":
        return None
    shard = cfg.shard_group_size or local_size
    if dp_size % shard:
        raise ConfigError(
            f"backend.fsdp.shard_group_size ({shard}) must divide the data-parallel size ({dp_size}); "
            "set it to a divisor, e.g. the GPUs per node"
        )
    return (dp_size // shard, shard)


def build_mesh(ctx: dist.DistContext, *, fsdp: FSDPSettings | None, tp_size: int) -> DeviceMesh:
    """Collective (it creates process groups). Dims: "shard" or ("replicate", "shard"), then "tp"."""
    dp_size = ctx.world_size // tp_size
    shape = None
    if fsdp is not None:
        hybrid_default = fsdp.sharding == "hybrid_shard" and fsdp.shard_group_size is None
        local = max(local_world_size() // tp_size, 1) if hybrid_default else 1
        shape = dp_mesh_shape(fsdp, dp_size, local)
    dims, names = ((dp_size,), ("shard",)) if shape is None else (shape, ("replicate", "shard"))
    if tp_size > 1:
        dims, names = (*dims, tp_size), (*names, "tp")
    return init_device_mesh(ctx.device_type, dims, mesh_dim_names=names)


def dp_dims(mesh: DeviceMesh) -> tuple[str, ...]:
    return tuple(n for n in (mesh.mesh_dim_names or ()) if n != "tp")


def model_blocks(model: nn.Module, wrap_classes: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules FSDP shards and activation checkpointing wraps one by one (never the root)."""
    classes = block_classes(model, wrap_classes)
    return [m for m in model.modules() if classes and isinstance(m, classes) and m is not model]


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    from scaletrain.engines.tensor_parallel import apply_tp as _apply_tp

    _apply_tp(model, mesh["tp"])


def apply_ac(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward. Hook-based, so parameter names stay plain."""
    for block in blocks:
        composable_checkpoint(block)


def apply_compile(blocks: list[nn.Module]) -> None:
    """Compile block by block, in place: graphs stay small and names keep no `_orig_mod.`."""
    for block in blocks:
        block.compile()


def mixed_precision(cfg: FSDPSettings, precision: str) -> MixedPrecisionPolicy:
    """Compute dtype from `precision` unless backend.fsdp.param_dtype says otherwise; fp32 reduction
    by default. fp16 parameters get fp32 gradient reduction too: the loss scaler unscales fp32 grads."""
    param = DTYPES[cfg.param_dtype or precision]
    return MixedPrecisionPolicy(
        param_dtype=None if param == torch.float32 else param, reduce_dtype=DTYPES[cfg.reduce_dtype]
    )


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], cfg: FSDPSettings, *, mesh: DeviceMesh,
               precision: str, device_type: str) -> None:
    """fully_shard each block, then the root, over the data-parallel dims of `mesh`."""
    if not blocks:
        log.warning("FSDP: no block classes found on %s; sharding the whole model as one unit "
                    "(set backend.fsdp.wrap_classes)", type(model).__name__)
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    )
    dp_mesh = mesh[dp_dims(mesh)] if "tp" in (mesh.mesh_dim_names or ()) else mesh
    common = {"mesh": dp_mesh, "mp_policy": mixed_precision(cfg, precision), "offload_policy": offload}
    reshard = cfg.sharding in ("full_shard", "hybrid_shard")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, **common)
    fully_shard(model, **common)  # the root keeps its parameters gathered after forward by default


def apply_ddp(model: nn.Module, cfg: DDPSettings, *, device: torch.device, compile: bool) -> Callable:
    """Replicate over every rank; returns the callable that runs forward (the DDP wrapper).

    The wrapper is compiled rather than the inner module, so DDP's bucketing still sees graph breaks."""
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=cfg.bucket_cap_mb,
                                  static_graph=cfg.static_graph)
    return torch.compile(ddp) if compile else ddp
