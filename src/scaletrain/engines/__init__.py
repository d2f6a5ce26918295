"""Engines: one per backend behind the `Engine` interface. Backends are imported only when chosen,
so a DDP run never imports deepspeed."""

from __future__ import annotations

import importlib
from typing import Any

from scaletrain.config import Config
from scaletrain.engines.base import Engine, EngineSpec, StepStats

_ENGINES = {
    "ddp": ("scaletrain.engines.ddp", "DDPEngine"),
    "fsdp": ("scaletrain.engines.fsdp", "FSDPEngine"),
    "deepspeed": ("scaletrain.engines.deepspeed_zero", "DeepSpeedEngine"),
}


def _backend_args(cfg: Config, world_size: int) -> tuple[Any, ...]:
    """Only the sub-configs each engine needs (DeepSpeed also needs its resolved JSON)."""
    kind = cfg.backend.kind
    if kind == "deepspeed":
        from scaletrain.ds_config import resolve_ds_config

        return (cfg.backend.deepspeed, resolve_ds_config(cfg, world_size=world_size), cfg.optim)
    return (getattr(cfg.backend, kind),)


def build_engine(spec: EngineSpec, cfg: Config) -> Engine:
    """Collective: wrapping a model is collective under every backend."""
    module_name, cls_name = _ENGINES[cfg.backend.kind]
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(spec, *_backend_args(cfg, spec.ctx.world_size))


__all__ = ["Engine", "EngineSpec", "StepStats", "build_engine"]
