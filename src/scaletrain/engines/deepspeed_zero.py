"""DeepSpeed ZeRO (stages 1-3, optimizer and parameter offload) behind the Engine interface.

What DeepSpeed owns: partitioning, gradient reduction, 1/grad_accum scaling in `backward`, fp16
loss scaling, clipping to `gradient_clipping`, and skipping an update whose global gradient norm is
not finite. What the harness keeps: the optimizer (torch AdamW over `optim.param_groups`, or
`DeepSpeedCPUAdam` with optimizer offload), the learning rate of every step (set on the param groups
from the pure schedule, so the curve equals DDP's; no DeepSpeed scheduler), and the step count.

Checkpoints are DeepSpeed's own files in `<tag>/deepspeed/` (`mp_rank_00_model_states.pt` and one
`*_optim_states.pt` per rank), with the loop's client state inside the model-states file; DeepSpeed's
own `latest` is never written. Its files are read with `weights_only=True` (see `_SafeTorchEngine`).
A tag written on another world size is converted with DeepSpeed's universal checkpoint tool first.

Imports: torch, deepspeed, `scaletrain.engines.base`, `scaletrain.checkpoint`, `scaletrain.config`,
`scaletrain.ds_config`, `scaletrain.dist`, `scaletrain.materialize`, `scaletrain.optim`, `scaletrain.errors`.
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

from scaletrain import dist
from scaletrain.checkpoint import layout
from scaletrain.checkpoint.weights import canonical_name
from scaletrain.config import DeepSpeedConfig, OptimConfig
from scaletrain.ds_config import HARNESS_SECTIONS, offload_on
from scaletrain.engines.base import Engine, EngineSpec, StepStats
from scaletrain.errors import CheckpointError
from scaletrain.materialize import WeightsSource, build_initialized, parameter_value, tie_groups
from scaletrain.optim import param_groups

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # <tag>/deepspeed/: the folder the consolidate tool reads; keep the name
STATE_KEY = "scaletrain"  # our entry in DeepSpeed's client_state


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every config value at INFO on each rank; keep that for logging.level=debug."""
    ours = logging.getLogger("scaletrain").getEffectiveLevel()
    logging.getLogger("DeepSpeed").setLevel(logging.DEBUG if ours <= logging.DEBUG else logging.WARNING)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    checkpoint_format = "deepspeed"

    def __init__(self, spec: EngineSpec, ds_cfg: DeepSpeedConfig, resolved: dict[str, Any], optim: OptimConfig):
        # ds_cfg's stage and offload flags are already merged into `resolved` by scaletrain.ds_config.
        super().__init__(spec)
        _quiet_deepspeed()
        config = {k: v for k, v in resolved.items() if k not in HARNESS_SECTIONS}
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
        maybe_use_safe_loading(self._ds)
        self._basic_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)

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

    def step(self, lr: float, *, force_skip: bool = False) -> StepStats:
        """Collective. DeepSpeed computes the global norm (all-reduced, so every rank agrees), clips,
        and skips the update when the norm is not finite; `force_skip` makes the inner optimizer's
        step a no-op for this call, so parameters, moments and step counts stay as they were."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._no_update() if force_skip else contextlib.nullcontext():
            self._ds.step()
        norm = self._ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        skipped = force_skip or not self._ds.was_step_applied() or not math.isfinite(norm)
        scale = float(self.optimizer.loss_scale) if self.spec.precision == "fp16" else None
        return StepStats(grad_norm=norm, lr=lr, skipped=skipped, loss_scale=scale)

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
        state = {STATE_KEY: {"client_state": client_state}}
        # Collective. DeepSpeed's `latest` is not written: the harness's meta.json and ckpt/latest rule.
        self._ds.save_checkpoint(save_dir=str(path), tag=DS_TAG, client_state=state, save_latest=False)

    def load_checkpoint(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        meta = layout.read_meta(path) or {}
        saved_world = int(meta.get("world_size", self.ctx.world_size))
        if saved_world != self.ctx.world_size:
            return self._load_other_world_size(path, saved_world)
        load_path, client = self._ds.load_checkpoint(
            str(path), tag=DS_TAG, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        return self._client_state(path, load_path, client)

    def _client_state(self, path: Path, load_path: Any, client: dict[str, Any] | None) -> dict[str, Any]:
        if load_path is None or not client or STATE_KEY not in client:
            raise CheckpointError(f"checkpoint {path}: no DeepSpeed state in {path / DS_TAG}; was it written by "
                                  "backend=deepspeed?")
        state = client[STATE_KEY]
        return state["client_state"]

    def _load_other_world_size(self, path: Path, saved_world: int) -> dict[str, Any]:
        """Collective. Rank 0 converts `<tag>/deepspeed` to DeepSpeed's universal format (once, kept
        beside it), then every rank loads its own slice of that for the new world size."""
        universal = path / UNIVERSAL_DIR
        err = None
        if self.ctx.is_main and not (universal / DS_TAG / "zero").is_dir():
            err = convert_to_universal(path / DS_TAG, universal / DS_TAG)
        err = dist.broadcast_object(err)
        if err:
            raise CheckpointError(f"checkpoint {path} was written on {saved_world} processes and this run has "
                                  f"{self.ctx.world_size}; converting it failed ({err}); convert by hand: "
                                  f"{convert_command(path)}")
        log.info("checkpoint %s: world size %d -> %d through DeepSpeed's universal format", path, saved_world,
                 self.ctx.world_size)
        with loading_universal(self._ds):
            load_path, client = self._ds.load_checkpoint(
                str(universal), tag=DS_TAG, load_module_strict=True, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        return self._client_state(path, load_path, client)

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


def build_zero3(factory: Callable[[], nn.Module], config: dict[str, Any], *, seed: int,
                source: Path | None) -> nn.Module:
    """Collective. The model built inside `deepspeed.zero.Init`, so each parameter is partitioned as
    soon as its module is constructed and no rank ever holds the whole model; then every parameter
    gets the harness's initial value (`scaletrain.materialize`: the same numbers as any other backend).

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


# ---------------------------------------------------------------------------------------------
# DeepSpeed's files: safe loading, universal conversion for a new world size.

UNIVERSAL_DIR = "deepspeed_universal"  # <tag>/deepspeed_universal/deepspeed/: a conversion kept beside the tag


def _safe_globals() -> list[Any]:
    """The few DeepSpeed classes its optimizer-state files hold besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def maybe_use_safe_loading(ds_engine: Any) -> None:
    """Swap DeepSpeed's torch checkpoint engine for one that reads with `weights_only=True`.

    DeepSpeed 0.19 reads its own files with `torch.load(weights_only=False)`, which runs any pickled
    code in a file from elsewhere. Ours allows tensors, containers and the classes in `_safe_globals`
    only. A non-default checkpoint engine (nebula, decoupled) is left as it is.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        return

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"checkpoint file {path} cannot be read safely "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from e

    ds_engine.checkpoint_engine = SafeTorchCheckpointEngine(ds_engine._config)


def convert_command(path: Path) -> str:
    return (f"python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {path / DS_TAG} "
            f"--output_folder {path / UNIVERSAL_DIR / DS_TAG}")


def convert_to_universal(src: Path, dst: Path) -> str | None:
    """Local (rank 0). DeepSpeed's converter in a child process, into a temporary folder renamed at the
    end; returns an error line or None. The converter reads the files with weights_only=False: it is
    meant for checkpoints this run wrote."""
    import shutil
    import subprocess
    import sys

    tmp = dst.parent.with_name(f".tmp-{dst.parent.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--input_folder", str(src), "--output_folder", str(tmp / dst.name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"ds_to_universal exited {proc.returncode}: {tail}"
    shutil.rmtree(dst.parent, ignore_errors=True)
    tmp.rename(dst.parent)
    return None


@contextlib.contextmanager
def loading_universal(ds_engine: Any) -> Iterator[None]:
    """DeepSpeed reads `checkpoint.load_universal` from its config object at load time: switch it on
    for this one load instead of making every run declare it."""
    cfg = ds_engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before
