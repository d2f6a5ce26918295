"""DeepSpeed ZeRO (stages 1-3, optimizer and parameter offload) behind the Engine interface.

What DeepSpeed owns: partitioning, gradient reduction, 1/grad_accum scaling in `backward`, fp16
loss scaling, clipping to `gradient_clipping`, and skipping an update whose global gradient norm is
not finite. What the harness keeps: the optimizer (torch AdamW over `optim.param_groups`, or
`DeepSpeedCPUAdam` with optimizer offload), the learning rate of every step (set on the param groups
from the pure schedule, so the curve equals DDP's; no DeepSpeed scheduler), and the step count.

Checkpoints are DeepSpeed's own files in `<tag>/deepspeed/`, written, read (with `weights_only=True`)
and converted for another world size by `scaletrain.checkpoint.deepspeed_state`; a tag of a
PyTorch-native engine is converted on the way in by `scaletrain.checkpoint.portable`.

Imports: torch, deepspeed, `scaletrain.engines.base`, `scaletrain.engines.grads`, `scaletrain.checkpoint`, `scaletrain.config`,
`scaletrain.engines.ds_config`, `scaletrain.errors`, `scaletrain.model` (`build`, `materialize`, `weights`), `scaletrain.optim`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn as nn

from scaletrain.checkpoint import deepspeed_state, portable
from scaletrain.config import OptimConfig
from scaletrain.engines.base import Engine, EngineSpec, StepStats
from scaletrain.engines.ds_config import HARNESS_SECTIONS, offload_on
from scaletrain.engines.grads import layer_grad_norms
from scaletrain.errors import ConfigError, TrainingError
from scaletrain.model.build import hidden_size
from scaletrain.model.materialize import (
    WeightsSource,
    build_initialized,
    build_on_meta,
    parameter_value,
    tie_groups,
)
from scaletrain.model.weights import canonical_name
from scaletrain.optim import param_groups

log = logging.getLogger(__name__)



def _quiet_deepspeed() -> None:
    """DeepSpeed logs every config value at INFO on each rank; keep that for logging.level=debug."""
    ours = logging.getLogger("scaletrain").getEffectiveLevel()
    logging.getLogger("DeepSpeed").setLevel(logging.DEBUG if ours <= logging.DEBUG else logging.WARNING)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    checkpoint_format = "deepspeed"

    def __init__(self, spec: EngineSpec, ds_cfg: Any, resolve: Callable[..., dict[str, Any]],
                 optim: OptimConfig):
        """`resolve(hidden_size=None)` gives the DeepSpeed config (`ds_config.resolve_ds_config`, with
        the `backend.deepspeed` section `ds_cfg`'s stage and offload flags merged in); ZeRO-3 asks again
        with the model's width."""
        super().__init__(spec)
        _quiet_deepspeed()
        config = _strip(resolve())
        if int(config["zero_optimization"]["stage"]) == 3:
            # One build on the meta device (no memory, no RNG): the model's width sizes ZeRO-3's buffers,
            # and a factory's lazy imports (transformers resolves model classes on first use) run here,
            # outside zero.Init's patched tensor constructors, where an import can fail.
            try:
                width = hidden_size(build_on_meta(spec.model_factory))
            except ConfigError:  # a model that cannot be built on meta: DeepSpeed's own sizes then
                width = None
            config = _strip(resolve(width))
        zero = config["zero_optimization"]
        self.stage = int(zero["stage"])
        if config["gradient_accumulation_steps"] != spec.grad_accum:  # our invariant: both from resolve_grad_accum
            raise AssertionError(f"grad_accum {spec.grad_accum} != {config['gradient_accumulation_steps']}")
        self.offload_optimizer = offload_on(zero, "offload_optimizer")
        # The process group exists (dist.init): deepspeed.init_distributed wraps it and creates none.
        # DeepSpeed insists on LOCAL_RANK, which srun and a plain `python` launch do not set.
        os.environ.setdefault("LOCAL_RANK", str(self.ctx.local_rank))
        if self.stage == 3:
            raw = build_zero3(spec.model_factory, config, seed=spec.seed, source=spec.init_from)
        else:  # ZeRO-1/2 keep whole parameters: the same values as DDP's build, then DeepSpeed partitions
            raw = build_initialized(spec.model_factory, device=torch.device("cpu"), seed=spec.seed,
                                    source=spec.init_from)
        # Canonical names of every parameter (tied ones listed twice).
        self._names = [(canonical_name(n), p) for n, p in raw.named_parameters(remove_duplicate=False)]
        self._buffer_names = [n for n, _ in raw.named_buffers() if n in raw.state_dict()]  # persistent only
        self._raw = raw
        optimizer = self._make_optimizer(raw, optim)
        self._ds, self.optimizer, _, _ = deepspeed.initialize(
            model=raw, optimizer=optimizer, config=config, dist_init_required=False
        )
        deepspeed_state.use_safe_loading(self._ds)
        self._basic_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.stage == 3 and not self.offload_optimizer and not offload_on(zero, "offload_param"):
            _share_fp32_master(self.optimizer)

    def _make_optimizer(self, raw: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
        if not self.offload_optimizer:
            return self.spec.optimizer_factory(raw)  # AdamW over optim.param_groups, as DDP has it
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-compiles its C++ op on first use (~90 s)

        return DeepSpeedCPUAdam(param_groups(raw, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                eps=optim.eps, weight_decay=optim.weight_decay, adamw_mode=True)

    # ------------------------------------------------------------------ forward / backward / step

    @property
    def module(self) -> nn.Module:
        return self._raw

    def _forward_module(self) -> Callable:
        return self._ds

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed's bf16/fp16 modes hold the module's parameters in that dtype already, so ops run
        # in it without autocast (autocast on top would upcast some ops to fp32 for nothing).
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Local. Tell DeepSpeed whether this micro-step ends the optimizer step: it reduces (stage 1)
        or finalises its partitioned gradients (stages 2, 3) only there. ZeRO 2/3 have no no_sync."""
        self._ds.set_gradient_accumulation_boundary(is_boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)  # divides by gradient_accumulation_steps (= our grad_accum) itself

    def step(self, lr: float, *, force_skip: bool = False, grad_scale: float = 1.0) -> StepStats:
        """Collective. DeepSpeed computes the global norm (all-reduced, so every rank agrees), clips,
        and skips the update when the norm is not finite; `force_skip` makes the inner optimizer's
        step a no-op for this call, so parameters, moments and step counts stay as they were."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._no_update() if force_skip else contextlib.nullcontext(), self._grad_scale(grad_scale):
            self._ds.step()
        norm = self._ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        skipped = force_skip or not self._ds.was_step_applied() or not math.isfinite(norm)
        scale = float(self.optimizer.loss_scale) if self.spec.precision == "fp16" else None
        return StepStats(grad_norm=norm, lr=lr, skipped=skipped, loss_scale=scale)

    def layer_grad_norms(self) -> dict[str, float]:
        """Collective (one all-reduce). L2 gradient norm per layer group (`engines.grads.layer_key`)
        from each rank's own gradient partition: ZeRO-1/2 the fragment of the partitioned gradient
        this rank owns, ZeRO-3 `safe_get_local_grad` (never the gathering `safe_get_full_grad`), so
        each element is counted once with weight 1; fp16 loss scale removed, before clipping.

        Call it after the last micro-batch's backward (the boundary, where DeepSpeed reduces and
        partitions) and before `step`, which consumes the gradients; on every rank."""
        world = self.ctx.world_size
        pieces = []
        for name, p in self._raw.named_parameters():
            if not p.requires_grad:
                continue
            grad, weight = _local_grad(p), 1.0
            if grad is None and p.grad is not None and not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping"):
                grad, weight = p.grad, 1.0 / world  # not partitioned: every rank holds the same gradient
            pieces.append((canonical_name(name), grad, weight))
        scale = float(self.optimizer.loss_scale) if self.spec.precision == "fp16" else 1.0
        return layer_grad_norms(pieces, self.ctx.device, scale=scale)

    @contextlib.contextmanager
    def _grad_scale(self, factor: float) -> Iterator[None]:
        """Multiply this step's gradients by `factor` inside DeepSpeed's own unscale-and-clip.

        ZeRO divides the gradients by its loss scale before clipping and reports the norm divided by
        it; for one step the scale it uses becomes (its scale / factor) through the optimizer's
        `override_loss_scale`, which changes nothing else (the backward pass and the dynamic fp16
        scaler keep their own value). Every ZeRO stage's optimizer has it."""
        if factor == 1.0:
            yield
            return
        opt = self.optimizer
        if not hasattr(opt, "override_loss_scale"):
            raise TrainingError(
                f"{type(opt).__name__} cannot rescale gradients, which batches with varying counts need; "
                "use a ZeRO stage of 1-3 or batches with a fixed count"
            )
        opt.override_loss_scale(float(opt.loss_scale) / factor)
        try:
            yield
        finally:
            opt.custom_loss_scaler, opt.external_loss_scale = False, None

    @contextlib.contextmanager
    def _no_update(self) -> Iterator[None]:
        opt = self._basic_optimizer
        original = opt.step
        opt.step = lambda *a, **k: None  # ZeRO then copies the unchanged fp32 partition back: no change
        try:
            yield
        finally:
            opt.step = original

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, async_save: bool = False) -> None:
        deepspeed_state.save(self._ds, path, client_state)

    def load_checkpoint(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        # A torch-native tag, or one of another ZeRO stage (DeepSpeed's loader reads only its own stage's
        # partitions), or any tag `scaletrain convert` hands over: converted on the way in.
        if (meta.get("portable") or portable.is_foreign(path, self.checkpoint_format)
                or portable.zero_stage(path, meta) not in (None, self.stage)):
            source = portable.open_source(path)
            moments = portable.restore_deepspeed(source, self._ds, self._raw)
            portable.notice(meta, f"deepspeed:{self.stage}" + ("+offload" if self.offload_optimizer else ""),
                            self.ctx.world_size, self.ctx.rank, portable.count_params(self._raw), moments)
            return portable.client_state(path)
        return deepspeed_state.load(self._ds, path, meta, world_size=self.ctx.world_size, rank=self.ctx.rank)

    # ------------------------------------------------------------------ export

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gathers every parameter's fp32 master copy in the same order."""
        full: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, p in self._names:
            if id(p) not in full:
                value = deepspeed.utils.safe_get_full_fp32_param(p)
                full[id(p)] = (value if value is not None else p.detach()).float().cpu().clone()
            out[name] = full[id(p)]
        buffers = dict(self._raw.named_buffers())
        for name in self._buffer_names:
            b = buffers[name].detach().cpu()
            out[canonical_name(name)] = (b.float() if b.is_floating_point() else b).clone()
        return out if self.ctx.is_main else {}


def _local_grad(p: nn.Parameter) -> torch.Tensor | None:
    """This rank's own piece of a ZeRO-partitioned gradient (None when it owns none of it)."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        return deepspeed.utils.safe_get_local_grad(p)
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: the fragment of this rank's partition
    if mapping is None:
        return None
    frag = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
    address = mapping.lp_fragment_address
    if frag.numel() == p.numel() and address.numel != p.numel():  # a whole-size buffer: keep our slice
        frag = frag.narrow(0, address.start, address.numel)
    return frag


def _share_fp32_master(optimizer: Any) -> int:
    """ZeRO-3 trained in fp32 keeps two identical fp32 copies of each partition: the parameters'
    flat partition and the optimizer's "master" copy. DeepSpeed means to share them when their dtype
    and device agree, but its check compares a torch.device with a device name and never matches, so
    here the master copy becomes the partition's storage (the tensor object, which the optimizer's
    param groups hold, stays the same). The step then updates the parameters in place and DeepSpeed's
    copy back to the partition is a copy onto itself. Saves one fp32 copy of the partition per rank.
    Returns how many sub-groups were shared."""
    shared = 0
    for low, master in zip(getattr(optimizer, "fp16_partitioned_groups_flat", ()),
                           getattr(optimizer, "fp32_partitioned_groups_flat", ())):
        if (low.dtype == master.dtype and low.device == master.device and low.shape == master.shape
                and low.data_ptr() != master.data_ptr()):
            master.data = low.data
            shared += 1
    return shared


def _strip(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k not in HARNESS_SECTIONS}


def build_zero3(factory: Callable[[], nn.Module], config: dict[str, Any], *, seed: int,
                source: Path | None) -> nn.Module:
    """Collective. The model built inside `deepspeed.zero.Init`, so each parameter is partitioned as
    soon as its module is constructed and no rank ever holds the whole model; then every parameter
    gets the harness's initial value (`scaletrain.model.materialize`: the same numbers as any other backend).

    Inside zero.Init a module's own initialiser writes into partitions already freed, so the values
    are set afterwards, one parameter at a time, under `GatheredParameters(modifier_rank=0)`: every
    rank gathers that one tensor, rank 0 writes the value, and DeepSpeed re-partitions it from rank 0
    (peak: the largest tensor, once)."""
    # zero.Init reads the world from deepspeed.comm: wrap the harness's process group first (no new one).
    deepspeed.init_distributed(dist_init_required=False, auto_mpi_discovery=False, verbose=False)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = factory()
    reader = WeightsSource(source) if source is not None else None
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for names, param in tie_groups(model):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(parameter_value(model, names, param, seed=seed, source=reader))
    return model
