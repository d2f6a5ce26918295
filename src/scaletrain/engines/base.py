"""The Engine interface every backend implements, and what they share (autocast, loss, step rules).

The loop talks to an Engine and never asks which backend it has. Public verbs hold the shared rules
and call small protected hooks each backend fills. Each verb says whether it is collective (every
rank must call it, in the same order) or local.

Imports: torch, `scaletrain.config`, `scaletrain.dist`, `scaletrain.objective`, `scaletrain.engines.parallel`. Not: loop, cli.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from scaletrain.config import Precision
from scaletrain.dist import DistContext
from scaletrain.engines.parallel import DTYPES
from scaletrain.objective import call_model

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports, the same for every backend."""

    grad_norm: float  # global L2 norm of the gradients before clipping (nan/inf when non-finite)
    lr: float  # learning rate this step used
    skipped: bool  # True when the update was not applied (non-finite gradients or fp16 overflow)
    loss_scale: float | None = None  # fp16 only


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine is built from, besides its own backend sub-config."""

    ctx: DistContext
    precision: Precision
    grad_accum: int
    grad_clip: float
    micro_batch_size: int
    seed: int  # initial weights are a function of (seed, parameter name): the same on every backend
    model_factory: Callable[[], nn.Module]  # builds the model in fp32 (engines choose CPU or meta)
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer]
    compile: bool = False
    checkpoint_format: str = "sharded"
    init_from: Path | None = None  # a consolidated weights file to start from, read tensor by tensor
    allow_tf32: bool = True


class Engine(ABC):
    """One backend behind one interface. Subclasses fill the hooks; they never inherit each other."""

    name: ClassVar[str]
    # What meta.json records as `format` and `consolidate` reads: "sharded", "full" or "deepspeed".
    checkpoint_format: str = "sharded"
    # Whether save_checkpoint can return before the files are written (see `wait_for_save`).
    supports_async_save: ClassVar[bool] = False

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.ctx = spec.ctx
        self._autocast_dtype = DTYPES[spec.precision]
        if spec.ctx.device_type == "cuda":
            # fp32 matmuls on TF32 tensor cores unless train.allow_tf32=false (10-bit mantissa inputs,
            # fp32 accumulation: nanoGPT's default and several times the fp32 throughput on A100/H100).
            torch.backends.cuda.matmul.allow_tf32 = spec.allow_tf32
            torch.backends.cudnn.allow_tf32 = spec.allow_tf32

    # ------------------------------------------------------------------ the model as the loop sees it

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped model (plain parameter names); for inspection, not for calling forward."""

    @abstractmethod
    def _forward_module(self) -> Callable[..., Any]:
        """The callable that runs forward (the wrapped, maybe compiled, model)."""

    def train(self, mode: bool = True) -> None:
        """Local. Switch dropout etc. on or off."""
        self.module.train(mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for bf16/fp16 on this device; a no-op in fp32."""
        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device_type, dtype=self._autocast_dtype)

    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Local. Wrap forward *and* backward of one micro-batch; off the boundary, skip gradient sync."""
        with self._no_sync() if not is_boundary else contextlib.nullcontext():
            yield

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, batch: Any) -> Any:
        """Collective under sharded backends. The model's outputs for one micro-batch that is already on
        this rank's device (`objective.to_device`), under autocast. The loss is the objective's, not
        the engine's (`scaletrain.objective`)."""
        with self.autocast():
            return call_model(self._forward_module(), batch)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Collective on the boundary micro-step. Takes the micro-batch loss; applies 1/grad_accum and
        any fp16 loss scaling; gradients are averaged over the data-parallel ranks; never steps."""

    @abstractmethod
    def step(self, lr: float, *, force_skip: bool = False, grad_scale: float = 1.0) -> StepStats:
        """Collective. Once per optimizer step: multiply the gradients by `grad_scale` (the loop's
        correction when micro-batches count different numbers of items), unscale, clip to grad_clip
        over all shards, update with learning rate `lr` (or skip on non-finite gradients or
        `force_skip`), zero gradients. The loop owns the schedule and the step count; engines hold no
        clock."""

    @abstractmethod
    def layer_grad_norms(self) -> dict[str, float]:
        """Collective. L2 gradient norm per layer group over all shards, before clipping; call after the
        last micro-batch's backward and before `step` (which clips and zeroes the gradients)."""

    # ------------------------------------------------------------------ checkpoints

    @abstractmethod
    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, async_save: bool = False) -> None:
        """Collective. Write this engine's state and `client_state` into the existing folder `path`.

        With `async_save` an engine whose `supports_async_save` is true may return before the files
        are written; `wait_for_save` then blocks until they are. Others ignore it and write in place."""

    @abstractmethod
    def load_checkpoint(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Collective. Restore the state saved in `path`, whose verified `meta.json` is `meta`; returns
        the client_state saved with it."""

    def wait_for_save(self) -> None:  # noqa: B027 (a hook with a do-nothing default)
        """Local. Block until an asynchronous save has finished writing (no-op when saves are sync)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. Consolidated fp32 model weights on rank 0 (CPU tensors); {} on other ranks."""

    def close(self) -> None:
        """Local. Wait for background work; the process group belongs to `dist`, not to the engine."""
        self.wait_for_save()
