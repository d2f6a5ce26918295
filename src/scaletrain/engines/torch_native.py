"""One engine for every PyTorch-native strategy: DDP, FSDP2 (four sharding strategies, offload,
mixed precision), tensor parallel, and their compositions.

The engine owns the model, the optimizer, the fp16 loss scaler, clipping, the update and checkpoint
I/O; how the model is parallelised is decided once, at construction, by composing the `apply_*`
functions of `scaletrain.engines.parallel` over one device mesh, in torchtitan's order: tensor parallel,
activation checkpointing, compile, then FSDP (or DDP). Checkpoints go through
`checkpoint.torch_state`, so every strategy reads every other's files at any world size; a DeepSpeed
tag is converted on the way in by `checkpoint.portable` (weights and AdamW state by parameter name).
Imports: torch, `scaletrain.engines`, `scaletrain.engines.parallel`, `scaletrain.model.materialize`, `scaletrain.checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from scaletrain.checkpoint import portable, torch_state
from scaletrain.engines import parallel
from scaletrain.engines.base import Engine, EngineSpec, StepStats
from scaletrain.engines.grads import (
    LossScaler,
    clip_grads_,
    global_grad_norm,
    layer_grad_norms,
    local_grads,
    torch_grad_pieces,
)
from scaletrain.model.materialize import build_initialized, build_on_meta, materialize

log = logging.getLogger(__name__)


class TorchNativeEngine(Engine):
    """DDP with the `ddp` settings, or FSDP2 with the `fsdp` ones (exactly one of them); tensor parallel
    (under FSDP) when tp_size > 1."""

    name = "torch"
    supports_async_save = True

    def __init__(self, spec: EngineSpec, *, ddp: parallel.DDPSettings | None = None,
                 fsdp: parallel.FSDPSettings | None = None, tp_size: int = 1) -> None:
        super().__init__(spec)
        assert (ddp is None) != (fsdp is None) and (fsdp is not None or tp_size == 1), "ddp or fsdp, tp under fsdp"
        self.name = ("fsdp" if fsdp is not None else "ddp") + (f"+tp{tp_size}" if tp_size > 1 else "")
        self.checkpoint_format = spec.checkpoint_format
        sharded = fsdp is not None or tp_size > 1
        self.mesh = parallel.build_mesh(spec.ctx, fsdp=fsdp, tp_size=tp_size) if sharded else None
        self._fsdp = fsdp is not None
        if self.mesh is None:  # replicated: every rank builds the whole model, with the same values
            model = build_initialized(spec.model_factory, device=spec.ctx.device, seed=spec.seed,
                                      source=spec.init_from)
            self._fwd = parallel.apply_ddp(model, ddp, device=spec.ctx.device, compile=spec.compile)
        else:  # sharded: built on meta, parallelised, then each rank materialises its own pieces
            model = build_on_meta(spec.model_factory)
            self._fwd = self._parallelize(model, fsdp=fsdp, tp_size=tp_size)
            offload = fsdp is not None and fsdp.cpu_offload
            materialize(model, device=torch.device("cpu") if offload else spec.ctx.device, seed=spec.seed,
                        source=spec.init_from)
        self._raw = model  # plain parameter names: no `module.` or `_orig_mod.` in checkpoints
        self.optimizer = spec.optimizer_factory(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = LossScaler() if spec.precision == "fp16" else None
        self._pending_save: Callable[[], None] | None = None
        if fsdp is not None:
            log.info("%s: FSDP %s on mesh %s%s%s", self.name, fsdp.sharding, dict(zip(self.mesh.mesh_dim_names,
                     self.mesh.shape)), ", cpu offload" if fsdp.cpu_offload else "",
                     ", activation checkpointing" if fsdp.activation_checkpointing else "")

    def _parallelize(self, model: nn.Module, *, fsdp: parallel.FSDPSettings, tp_size: int) -> Callable:
        """Collective. Compose the sharded strategy on a meta model; returns the callable that runs forward."""
        spec = self.spec
        if tp_size > 1:
            parallel.apply_tp(model, self.mesh)
        blocks = parallel.model_blocks(model, fsdp.wrap_classes)
        if fsdp.activation_checkpointing:
            parallel.apply_ac(blocks)
        if spec.compile:
            parallel.apply_compile(blocks)
        parallel.apply_fsdp(model, blocks, fsdp, mesh=self.mesh, precision=spec.precision,
                            device_type=spec.ctx.device_type)
        return model

    # ------------------------------------------------------------------ forward / backward / step

    @property
    def module(self) -> nn.Module:
        return self._raw

    def _forward_module(self) -> Callable:
        return self._fwd

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        if not self._fsdp:
            with self._fwd.no_sync():  # DDP decides in forward, so this covers forward and backward
                yield
            return
        # FSDP2 decides in backward; off the boundary it keeps unsharded gradients and reduces nothing.
        self._raw.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._raw.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.spec.grad_accum
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()

    def step(self, lr: float, *, force_skip: bool = False, grad_scale: float = 1.0) -> StepStats:
        """Collective (the norm's all-reduce). Every rank computes the same norm, so every rank makes
        the same skip decision without a broadcast."""
        if grad_scale != 1.0:
            torch._foreach_mul_(local_grads(self._params), grad_scale)
        if self.scaler is not None:
            self.scaler.unscale_(self._params)
        norm = global_grad_norm(self._params, self.ctx.device)
        value = float(norm)  # the one host sync of a step: the skip decision and the log need it
        finite = math.isfinite(value)
        skipped = force_skip or not finite
        if not skipped:
            clip_grads_(self._params, norm, self.spec.grad_clip if self.spec.grad_clip > 0 else math.inf)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        scale = None
        if self.scaler is not None:
            self.scaler.update(overflow=skipped)
            scale = self.scaler.scale
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=value, lr=lr, skipped=skipped, loss_scale=scale)

    def layer_grad_norms(self) -> dict[str, float]:
        """Collective (one all-reduce). L2 gradient norm per layer group (`engines.grads.layer_key`:
        `blocks.3`, `wte`, `ln_f`, ...) over all shards, fp16 loss scale removed, before clipping.

        Call it after the last micro-batch's backward and before `step` (which clips and zeroes the
        gradients), on every rank; the loop does so every `logging.grad_norm_every` steps."""
        scale = self.scaler.scale if self.scaler is not None else 1.0
        return layer_grad_norms(torch_grad_pieces(self._raw.named_parameters()), self.ctx.device, scale=scale)

    # ------------------------------------------------------------------ checkpoints

    def _engine_state(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

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

    def close(self) -> None:
        super().close()
        torch_state.release_async_group()

    def load_checkpoint(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        if portable.is_foreign(path, self.checkpoint_format):  # a DeepSpeed tag: converted on the way in
            source = portable.open_source(path)
            moments = portable.restore_torch(source, self._raw, self.optimizer)
            portable.notice(meta, self.name, self.ctx.world_size, self.ctx.rank, portable.count_params(self._raw),
                            moments)
            return portable.client_state(path)
        engine_state, client_state = torch_state.load(path, model=self._raw, optimizer=self.optimizer)
        if self.scaler is not None and engine_state.get("scaler"):
            self.scaler.load_state_dict(engine_state["scaler"])
        return client_state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return torch_state.full_model_state(self._raw)
