"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded.

Each block (the model's `block_classes`, or `backend.fsdp.wrap_classes`) becomes one FSDP unit that
is all-gathered for its forward and backward and reduce-scattered after; the root unit holds the
rest (embeddings, final norm, head). Strategies map onto FSDP2 as:

  full_shard     1-D mesh over all ranks; blocks reshard after forward (ZeRO-3)
  shard_grad_op  1-D mesh; parameters stay gathered between forward and backward (ZeRO-2-like)
  hybrid_shard   2-D mesh (replicate, shard): shard within groups of `shard_group_size` ranks
                 (default: the ranks on one host), replicate across groups
  no_shard       2-D mesh (world, 1): every rank holds everything, gradients are all-reduced (DDP)

fp16 is refused (no sharded loss scaler here; bf16 needs none). Checkpoints go through
`checkpoint.torch_state`, which DDP shares, so a sharded checkpoint reshards to any world size.

Imports: torch, `scaletrain.engines.base`, `scaletrain.checkpoint`, `scaletrain.config`,
`scaletrain.dist`, `scaletrain.errors`, `scaletrain.model`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed._composable import checkpoint as apply_checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from scaletrain import dist
from scaletrain.checkpoint import torch_state
from scaletrain.checkpoint.weights import complete_tied
from scaletrain.config import FSDPConfig
from scaletrain.engines.base import DTYPES, Engine, EngineSpec, StepStats, torch_optimizer_step
from scaletrain.errors import ConfigError
from scaletrain.model import block_classes

log = logging.getLogger(__name__)


def local_world_size() -> int:
    """Collective. Ranks on this host, from the hosts every rank reports (launcher-independent)."""
    hosts = dist.all_gather_object(socket.gethostname())
    return hosts.count(socket.gethostname())


def mesh_shape(cfg: FSDPConfig, world_size: int, local_size: int) -> tuple[int, int] | None:
    """(replicate, shard) sizes of a 2-D mesh, or None for a 1-D mesh over every rank."""
    if cfg.sharding == "no_shard":
        return (world_size, 1)
    if cfg.sharding != "hybrid_shard":
        return None
    shard = cfg.shard_group_size or local_size
    if world_size % shard:
        raise ConfigError(
            f"backend.fsdp.shard_group_size ({shard}) must divide the world size ({world_size}); "
            "set it to a divisor, e.g. the GPUs per node"
        )
    return (world_size // shard, shard)


def build_mesh(cfg: FSDPConfig, ctx: dist.DistContext) -> DeviceMesh:
    """Collective (it creates process groups)."""
    local = local_world_size() if cfg.sharding == "hybrid_shard" and cfg.shard_group_size is None else 1
    shape = mesh_shape(cfg, ctx.world_size, local)
    if shape is None:
        return init_device_mesh(ctx.device_type, (ctx.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(ctx.device_type, shape, mesh_dim_names=("replicate", "shard"))


def mixed_precision(cfg: FSDPConfig, precision: str) -> MixedPrecisionPolicy:
    """Compute dtype from `precision` unless backend.fsdp.param_dtype says otherwise; fp32 reduction by default."""
    param = DTYPES[cfg.param_dtype or precision]
    return MixedPrecisionPolicy(
        param_dtype=None if param == torch.float32 else param, reduce_dtype=DTYPES[cfg.reduce_dtype]
    )


def check_precision(cfg: FSDPConfig, precision: str) -> None:
    if "fp16" in (precision, cfg.param_dtype):
        raise ConfigError("precision: fp16 is not supported with backend=fsdp (no sharded loss scaler); use bf16")


def apply_fsdp(model: nn.Module, cfg: FSDPConfig, *, mesh: DeviceMesh, precision: str, device_type: str,
               compile: bool) -> list[nn.Module]:
    """Checkpoint, compile and shard each block, then shard the root. Returns the blocks."""
    classes = block_classes(model, cfg.wrap_classes)
    blocks = [m for m in model.modules() if classes and isinstance(m, classes) and m is not model]
    if not blocks:
        log.warning("FSDP: no block classes found on %s; sharding the whole model as one unit "
                    "(set backend.fsdp.wrap_classes)", type(model).__name__)
    # Composable checkpointing works through hooks, so parameter names stay canonical (no wrapper prefix).
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    )
    common = {"mesh": mesh, "mp_policy": mixed_precision(cfg, precision), "offload_policy": offload}
    reshard = cfg.sharding in ("full_shard", "hybrid_shard")
    for block in blocks:
        if cfg.activation_checkpointing:
            apply_checkpoint(block)
        if compile:
            block.compile()  # in place: no `_orig_mod.` in parameter names
        fully_shard(block, reshard_after_forward=reshard, **common)
    fully_shard(model, **common)  # the root keeps its parameters gathered after forward by default
    return blocks


class FSDPEngine(Engine):
    name = "fsdp"
    supports_async_save = True

    def __init__(self, spec: EngineSpec, cfg: FSDPConfig) -> None:
        check_precision(cfg, spec.precision)
        super().__init__(spec)
        self.cfg = cfg
        raw = spec.model_factory()
        if spec.init_state is not None:  # before sharding: a plain module takes the full dict
            raw.load_state_dict(complete_tied(raw, spec.init_state()), strict=True)
        self.mesh = build_mesh(cfg, spec.ctx)
        # fully_shard moves each unit to the device as it shards it, so the whole unsharded model is
        # never on the device at once; with cpu_offload the shards then go back to the CPU.
        apply_fsdp(raw, cfg, mesh=self.mesh, precision=spec.precision, device_type=spec.ctx.device_type,
                   compile=spec.compile)
        self._root: FSDPModule = raw  # type: ignore[assignment]
        self._raw = raw
        self.optimizer = spec.optimizer_factory(raw)
        self._params = [p for p in raw.parameters() if p.requires_grad]
        self._pending_save: Callable[[], None] | None = None
        log.info("FSDP %s on mesh %s%s%s", cfg.sharding, tuple(self.mesh.shape),
                 ", cpu offload" if cfg.cpu_offload else "",
                 ", activation checkpointing" if cfg.activation_checkpointing else "")

    @property
    def module(self) -> nn.Module:
        return self._raw

    def _forward_module(self) -> Callable:
        return self._raw

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        # FSDP2 decides in backward; off the boundary it keeps unsharded gradients and reduces nothing.
        self._root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._root.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.spec.grad_accum).backward()

    def _clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Collective. Global L2 norm over every shard, then scale in place when above max_norm.

        Squares of local shards are summed and all-reduced over the shard group only (replicas hold
        the same values). The sum runs on the compute device, so offloaded CPU gradients work under NCCL.
        """
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if local:
            sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in local]).square().sum()
        else:
            sq = torch.zeros((), dtype=torch.float32)
        sq = sq.to(self.ctx.device)
        if self.mesh["shard"].size() > 1:
            tdist.all_reduce(sq, group=self.mesh["shard"].get_group())  # collective
        norm = sq.sqrt()
        if math.isfinite(max_norm) and local:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in local:
                by_device.setdefault(g.device, []).append(g)
            for device, group in by_device.items():
                torch._foreach_mul_(group, coef.to(device))
        return norm

    def step(self, *, force_skip: bool = False) -> StepStats:
        stats = torch_optimizer_step(
            params=self._params,
            optimizer=self.optimizer,
            scaler=None,
            grad_clip=self.spec.grad_clip,
            lr=self._next_lr(),
            force_skip=force_skip,
            clip_fn=self._clip,
        )
        self.num_steps += 1
        return stats

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, async_save: bool = False) -> None:
        self.wait_for_save()
        self._pending_save = torch_state.save(
            path,
            model=self._raw,
            optimizer=self.optimizer,
            fmt=self.spec.checkpoint_format,
            engine_state={"num_steps": self.num_steps},
            client_state=client_state,
            async_save=async_save and self.spec.checkpoint_format == "sharded",
        )

    def wait_for_save(self) -> None:
        if self._pending_save is not None:
            pending, self._pending_save = self._pending_save, None
            pending()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        engine_state, client_state = torch_state.load(path, model=self._raw, optimizer=self.optimizer)
        self.num_steps = int(engine_state["num_steps"])
        return client_state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return torch_state.full_model_state(self._raw)
