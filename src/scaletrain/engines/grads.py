"""Gradient rules every torch-native strategy shares: the global norm over shards, clipping, and a
dynamic loss scaler whose overflow decision every rank agrees on.

The global norm is one all-reduce over the world, whatever the layout: each rank adds the squares of
its local gradient pieces, weighted by the share of the world that holds a different piece. A plain
tensor (DDP, or a parameter tensor parallel leaves replicated) is held by every rank, weight
1/world; a DTensor sharded over k ranks of the world (FSDP's shard dim, TP's dim, or both) weight
k/world. Summed over the world, every distinct element counts exactly once, for DDP, every FSDP
strategy (hybrid replicas are not double counted), tensor parallel and their compositions.

Per-layer norms (`layer_grad_norms`) use the same weighting, one squared sum per group of
parameters, all groups in one all-reduce. A group is a parameter name up to its first numeric part
(`blocks.3.attn.qkv.weight` -> `blocks.3`, `model.layers.0.mlp.up.weight` -> `model.layers.0`), else
the module that owns it (`wte.weight` -> `wte`, `model.norm.weight` -> `model.norm`).

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
    """Collective when any gradient is a DTensor shard. L2 norm of all gradients of the model, as a 0-d
    fp32 tensor on `device`.

    The per-tensor norms run where the gradients live (CPU under offload) and only their weighted
    squares move to `device`, so no host sync happens here under CUDA."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    by_weight: dict[float, list[torch.Tensor]] = defaultdict(list)
    sharded = False
    for p in params:
        if p.grad is not None:
            sharded = sharded or isinstance(p.grad, DTensor)
            local, weight = _local_and_weight(p.grad, world)
            by_weight[weight].append(local)
    if not sharded:
        # Plain gradients are whole and, after DDP's all-reduce, the same on every rank (one reduced
        # result, copied to all): every rank computes the same norm without a collective.
        world, by_weight = 1, {1.0: [t for ts in by_weight.values() for t in ts]}
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for weight, tensors in by_weight.items():
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32).to(device, non_blocking=True) for t in tensors]
        sq = sq + torch.stack(norms).square().sum() * weight
    if world > 1:
        tdist.all_reduce(sq)  # collective: every rank gets the same norm, so the same skip decision
    return sq.sqrt()


def layer_key(name: str) -> str:
    """The group a parameter belongs to, by name (see the module docstring)."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod", "_fsdp_wrapped_module",
                                                       "_checkpoint_wrapped_module")]
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or parts[0]


def layer_grad_norms(pieces: Iterable[tuple[str, torch.Tensor | None, float]], device: torch.device, *,
                     scale: float = 1.0) -> dict[str, float]:
    """Collective (one all-reduce). L2 gradient norm per layer group over the whole world.

    `pieces` are (parameter name, this rank's gradient piece or None, weight), in the same order on
    every rank (so every rank lists the same groups); a weight is the share of the world holding a
    different copy of that piece (see the module docstring; a DeepSpeed partition owned by one rank
    has weight 1). Gradients still multiplied by a loss scale are divided by `scale`. Local pieces are
    reduced where they live, so offloaded gradients do not move whole."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    index: dict[str, int] = {}
    partial: list[torch.Tensor] = []
    for name, grad, weight in pieces:
        key = layer_key(name)
        if key not in index:
            index[key] = len(index)
            partial.append(torch.zeros((), dtype=torch.float32, device=device))
        if grad is not None and grad.numel():
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            norm = torch.linalg.vector_norm(local, dtype=torch.float32).to(device)
            partial[index[key]] = partial[index[key]] + norm.square() * weight
    if not partial:
        return {}
    sq = torch.stack(partial)
    if world > 1:
        tdist.all_reduce(sq)
    norms = (sq.sqrt() / scale).tolist()
    return {key: norms[i] for key, i in index.items()}


def torch_grad_pieces(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, torch.Tensor | None, float]]:
    """(name, gradient, weight) of plain and DTensor gradients (DDP, FSDP2, tensor parallel)."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    out: list[tuple[str, torch.Tensor | None, float]] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            out.append((name, None, 0.0))
        else:
            local, weight = _local_and_weight(p.grad, world)
            out.append((name, local, weight))
    return out


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
