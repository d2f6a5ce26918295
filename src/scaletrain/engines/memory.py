"""What every backend's memory planner shares: the model's tensors as the planner sees them, the
bytes of one rank's state, and the units (blocks, then the root) that FSDP and ZeRO-3 gather.

`scaletrain.engines.plan` builds a `Layout` once per question (the model on the meta device, its
distinct tensors) and asks the backend's own planner (`Backend.plan`) for each rank's `StateBytes`.
Imports no torch at import time. Imports: `scaletrain.config`, `scaletrain.model.build` (lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scaletrain.config import Config

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq, in the master dtype (fp32)
STEP_BYTES = 4  # torch AdamW keeps `step` as a 0-d fp32 tensor per parameter tensor


@dataclass(frozen=True)
class Tensor:
    """One distinct parameter: its name, full shape, trainable flag, and whether weight decay applies."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool = True
    decay: bool = True  # optim.param_groups: >= 2 dims decay

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """What a backend's planner is given: the config, the model on meta, its tensors, the world."""

    cfg: Config
    model: Any
    tensors: list[Tensor]
    world: int
    procs_per_node: int


@dataclass(frozen=True)
class StateBytes:
    """One rank's bytes: model state and the engine's buffers on the device, offloaded state on the host."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    host: int = 0

    @property
    def model_state(self) -> int:
        return self.params + self.grads + self.optimizer + self.host


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tensors_of(model: Any) -> list[Tensor]:
    """The model's distinct parameters (a tied tensor once, under its first name)."""
    return [Tensor(name, tuple(p.shape), p.requires_grad, len(p.shape) >= 2) for name, p in model.named_parameters()]


def units(model: Any, wrap_classes: tuple[str, ...] = ()) -> list[list[str]]:
    """The gathering units: each block's parameter names, then the root's (everything else)."""
    from scaletrain.model.build import block_classes

    classes = block_classes(model, wrap_classes)
    blocks = [m for m in model.modules() if classes and isinstance(m, classes) and m is not model]
    ids: dict[int, int] = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            ids.setdefault(id(p), i)
    out: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    for name, p in model.named_parameters():
        out[ids.get(id(p), len(blocks))].append(name)
    return out
