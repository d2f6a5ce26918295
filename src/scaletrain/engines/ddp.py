"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced in buckets.

Imports: torch, `scaletrain.engines.base`, `scaletrain.checkpoint.torch_state`, `scaletrain.config`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from scaletrain.checkpoint import torch_state
from scaletrain.checkpoint.weights import complete_tied
from scaletrain.config import DDPConfig
from scaletrain.engines.base import Engine, EngineSpec, StepStats, torch_optimizer_step


class DDPEngine(Engine):
    name = "ddp"
    supports_async_save = True

    def __init__(self, spec: EngineSpec, cfg: DDPConfig) -> None:
        super().__init__(spec)
        raw = spec.model_factory().to(spec.ctx.device)
        if spec.init_state is not None:
            raw.load_state_dict(complete_tied(raw, spec.init_state()), strict=True)
        self._raw = raw  # plain parameter names: no `module.` or `_orig_mod.` in checkpoints
        device_ids = [spec.ctx.device.index] if spec.ctx.device_type == "cuda" else None
        self._ddp = DistributedDataParallel(
            raw, device_ids=device_ids, bucket_cap_mb=cfg.bucket_cap_mb, static_graph=cfg.static_graph
        )
        # Compile the DDP wrapper, not the inner module, so DDP's bucketing still sees the graph breaks.
        self._fwd: Callable = torch.compile(self._ddp) if spec.compile else self._ddp
        self.optimizer = spec.optimizer_factory(raw)
        self._params = [p for p in raw.parameters() if p.requires_grad]
        self.scaler = (
            torch.amp.GradScaler(spec.ctx.device_type) if spec.precision == "fp16" else None
        )
        self._pending_save: Callable[[], None] | None = None

    @property
    def module(self) -> nn.Module:
        return self._raw

    def _forward_module(self) -> Callable:
        return self._fwd

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self._ddp.no_sync()  # DDP decides in forward, so this covers forward and backward

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.spec.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, *, force_skip: bool = False) -> StepStats:
        stats = torch_optimizer_step(
            params=self._params,
            optimizer=self.optimizer,
            scaler=self.scaler,
            grad_clip=self.spec.grad_clip,
            lr=self._next_lr(),
            force_skip=force_skip,
        )
        self.num_steps += 1
        return stats

    def _engine_state(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, async_save: bool = False) -> None:
        self.wait_for_save()
        self._pending_save = torch_state.save(
            path,
            model=self._raw,
            optimizer=self.optimizer,
            fmt=self.spec.checkpoint_format,
            engine_state=self._engine_state(),
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
        if self.scaler is not None and engine_state.get("scaler"):
            self.scaler.load_state_dict(engine_state["scaler"])
        return client_state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return torch_state.full_model_state(self._raw)
