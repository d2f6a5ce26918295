"""Gradient rules every torch-native strategy shares: the global norm over shards, clipping, and a
dynamic loss scaler whose overflow decision every rank agrees on.

The global norm is one all-reduce over the world, whatever the layout: each rank adds the squares of
its local gradient pieces, weighted by the share of the world that holds a different piece. A plain
tensor (DDP, or a parameter tensor parallel leaves replicated) is held by every rank, weight
1/world; a DTensor sharded over k ranks of the world (FSDP's shard dim, TP's dim, or both) weight
k/world. Summed over the world, every distinct element counts exactly once, for DDP, every FSDP
strategy (hybrid replicas are not double counted), tensor parallel and their compositions.

The loss scaler follows torch.amp.GradScaler's defaults and rules (scale 2**16, halve on overflow,
double after 2000 clean steps) but decides overflow from that global norm, so under FSDP and TP every
rank skips the same steps: a per-shard inf check would let ranks disagree.
Imports: torch, nothing of ours.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _local_and_weight(grad: torch.Tensor, world: int) -> tuple[torch.Tensor, float]:
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        # Any placement but Replicate splits the tensor: Shard, and FSDP-over-TP's _StridedShard, whose
        # is_shard() is False (torch 2.13). Partial cannot occur: gradients are reduced by now.
        shards = math.prod(mesh.size(i) for i, pl in enumerate(grad.placements) if not pl.is_replicate())
        return grad.to_local(), shards / world
    return grad, 1.0 / world


def local_grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """This rank's pieces of every gradient (DTensors unwrapped), in parameter order."""
    out = []
    for p in params:
        if p.grad is not None:
            out.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
    return out


def global_grad_norm(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """Collective. L2 norm of all gradients of the model, as a 0-d fp32 tensor on `device`.

    The per-tensor norms run where the gradients live (CPU under offload) and only their weighted
    squares move to `device`, so no host sync happens here under CUDA."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    by_weight: dict[float, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            local, weight = _local_and_weight(p.grad, world)
            by_weight[weight].append(local)
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for weight, tensors in by_weight.items():
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32).to(device, non_blocking=True) for t in tensors]
        sq = sq + torch.stack(norms).square().sum() * weight
    if world > 1:
        tdist.all_reduce(sq)  # collective: every rank gets the same norm, so the same skip decision
    return sq.sqrt()


def clip_grads_(params: Iterable[nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Local. Scale every gradient piece by min(1, max_norm / norm), on the device each lives on."""
    if not math.isfinite(max_norm):
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in local_grads(params):
        by_device[g.device].append(g)
    for device, group in by_device.items():
        torch._foreach_mul_(group, coef.to(device, non_blocking=True))


class LossScaler:
    """Dynamic fp16 loss scaling with a world-wide overflow decision (see the module docstring)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params: Iterable[nn.Parameter]) -> None:
        """Local. Divide every gradient piece by the scale (inf and nan stay what they are)."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in local_grads(params):
            by_device[g.device].append(g)
        for group in by_device.values():
            torch._foreach_mul_(group, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """Local, from an agreed decision. Halve on overflow; grow after `growth_interval` clean steps."""
        if overflow:
            self.scale *= self.backoff_factor
            self._clean_steps = 0
            return
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self._clean_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
