"""DistributedDataParallel: every rank holds the whole model and optimizer; gradients are all-reduced
in buckets. Spec `ddp`; section `backend.ddp.*`; the torch-native engine, imported only to build.
Imports: `scaletrain.config`, `scaletrain.errors`, `scaletrain.engines.backends.base`, `scaletrain.engines.memory`,
`scaletrain.engines.torch_native` (to build), `scaletrain.engines.base` (types only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from scaletrain.config import Config
from scaletrain.config.schema import Int, Section
from scaletrain.engines.backends.base import Backend, check_tp_divides
from scaletrain.engines.memory import ADAM_MOMENTS, STEP_BYTES, Layout, StateBytes
from scaletrain.errors import ConfigError

if TYPE_CHECKING:
    from scaletrain.engines.base import Engine, EngineSpec


class DDPConfig(Section):
    bucket_cap_mb: Int = Field(25, ge=1)
    static_graph: bool = False


class DDPBackend(Backend):
    kind = "ddp"
    config_section = DDPConfig
    spec_words = ("ddp",)
    spec_help = "ddp"
    default_specs = ("ddp",)

    def validate(self, cfg: Config, world_size: int) -> None:
        check_tp_divides(cfg, world_size)
        tp = cfg.backend.tp_size
        if tp > 1:
            raise ConfigError(f"backend.tp_size={tp} composes with backend=fsdp (FSDP over the data-parallel "
                              f"ranks), not backend={cfg.backend.kind}; use backend=fsdp or the spec tp:{tp}")

    def ddp_settings(self, cfg: Config) -> DDPConfig:
        """The DDP wrapper's settings (a variant backend may take them from its own section)."""
        return cfg.backend.ddp

    def build(self, spec: EngineSpec, cfg: Config) -> Engine:
        from scaletrain.engines.torch_native import TorchNativeEngine

        return TorchNativeEngine(spec, ddp=self.ddp_settings(cfg), tp_size=cfg.backend.tp_size)

    def plan(self, layout: Layout, rank: int) -> StateBytes:
        """fp32 parameters, gradients and AdamW state on every rank, plus DDP's gradient buckets (one
        more copy of every trainable gradient)."""
        trainable = sum(t.numel for t in layout.tensors if t.requires_grad)
        steps = sum(STEP_BYTES for t in layout.tensors if t.requires_grad)
        params = sum(t.numel for t in layout.tensors) * 4
        return StateBytes(params=params, grads=4 * trainable, optimizer=ADAM_MOMENTS * 4 * trainable + steps,
                          buffers=4 * trainable)
