"""DeepSpeed ZeRO stages 1-3, optimizer and parameter offload, behind the same verbs.

Specs `deepspeed[:STAGE]` (default 2) with `+offload`; section `backend.deepspeed.*`, or a DeepSpeed
JSON (`--ds FILE`) whose "auto" values the harness fills (`scaletrain.engines.ds_config`); its own
checkpoint files, one partition per rank. deepspeed itself is imported only to build. Imports:
`scaletrain.config`, `scaletrain.errors`, `scaletrain.engines.backends.base`, `scaletrain.engines.ds_config`,
`scaletrain.engines.memory`, `scaletrain.model.build` and `scaletrain.engines.deepspeed_zero` (inside
functions), `scaletrain.engines.base` (types only).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from scaletrain.config import Config
from scaletrain.config.schema import Section
from scaletrain.engines.backends.base import Backend, SpecError
from scaletrain.engines.ds_config import DEFAULT_STAGE, offload_on, read_ds_json, resolve_ds_config
from scaletrain.engines.memory import (
    ADAM_MOMENTS,
    BYTES,
    STEP_BYTES,
    Layout,
    StateBytes,
    Tensor,
    ceil_div,
    units,
)
from scaletrain.errors import ConfigError

if TYPE_CHECKING:
    from scaletrain.engines.base import Engine, EngineSpec

# Help of the launcher flag that selects DeepSpeed with a JSON file (`--ds FILE`).
DS_FLAG_HELP = "DeepSpeed JSON: selects backend=deepspeed with that config (see ds_configs/)"
ZERO_ALIGN = 2  # ZeRO-1/2 align each flat group to 2 x world elements (nccl_start_alignment_factor)
STAGES = ("1", "2", "3")


class DeepSpeedConfig(Section):
    config: Path | None = Field(None, description="A DeepSpeed JSON (see ds_configs/); `--ds FILE` sets it.")
    stage: Literal[0, 1, 2, 3] | None = Field(None, description="ZeRO stage; default 2 without a file.")
    offload_optimizer: bool | None = None
    offload_param: bool | None = None


class DeepSpeedBackend(Backend):
    kind = "deepspeed"
    config_section = DeepSpeedConfig
    spec_words = ("deepspeed",)
    spec_help = f"deepspeed[:{'|'.join(STAGES)}]"
    default_specs = (*(f"deepspeed:{s}" for s in STAGES), "deepspeed:2+offload", "deepspeed:3+offload")
    # No spec means a stage or offload unless it says so: the JSON (or the default stage) decides.
    spec_resets: ClassVar[dict[str, Any]] = {
        "backend.deepspeed.stage": None, "backend.deepspeed.offload_optimizer": None,
        "backend.deepspeed.offload_param": None,
    }
    fixed_world = "DeepSpeed files are one partition per rank"

    def parse_spec(self, word: str, arg: str, offload: bool) -> dict[str, Any]:
        if arg and arg not in STAGES:
            raise SpecError(f"unknown ZeRO stage {arg!r}")
        stage = int(arg or DEFAULT_STAGE)
        out: dict[str, Any] = {"backend.kind": self.kind, "backend.deepspeed.stage": stage}
        if offload:
            out["backend.deepspeed.offload_optimizer"] = True
            out["backend.deepspeed.offload_param"] = stage == 3
        return out

    def spec_of(self, cfg: Config) -> str:
        """With a JSON, its stage and optimizer offload where the config leaves them (the file is read:
        the run resolves its spec once, at plan time)."""
        ds = cfg.backend.deepspeed
        stage, offload = (ds.stage if ds.stage is not None else DEFAULT_STAGE), bool(ds.offload_optimizer)
        if ds.config is not None:
            zero = read_ds_json(ds.config).get("zero_optimization", {})
            stage = ds.stage if ds.stage is not None else zero.get("stage", DEFAULT_STAGE)
            offload = ds.offload_optimizer if ds.offload_optimizer is not None else offload_on(zero, "offload_optimizer")
        return f"deepspeed:{stage}" + ("+offload" if offload else "")

    def validate(self, cfg: Config, world_size: int) -> None:
        if cfg.backend.tp_size > 1:
            raise ConfigError("backend.tp_size > 1 is not supported with backend=deepspeed; use backend=fsdp for "
                              "tensor parallel")
        resolve_ds_config(cfg, world_size=world_size)  # its JSON's "auto" values and conflicts

    def build(self, spec: EngineSpec, cfg: Config) -> Engine:
        from scaletrain.engines.deepspeed_zero import DeepSpeedEngine

        def resolve(hidden_size: int | None = None) -> dict:
            return resolve_ds_config(cfg, world_size=spec.ctx.world_size, hidden_size=hidden_size)

        return DeepSpeedEngine(spec, cfg.backend.deepspeed, resolve, cfg.optim)

    def checkpoint_format(self, cfg: Config) -> str:
        return "deepspeed"

    def plan_ranks(self, world: int) -> range:
        return range(world)  # ZeRO-1/2 ranks differ by which whole parameters overlap their partition

    def plan(self, layout: Layout, rank: int) -> StateBytes:
        from scaletrain.model.build import hidden_size

        cfg = layout.cfg
        ds = resolve_ds_config(cfg, world_size=layout.world, hidden_size=hidden_size(layout.model))  # as the engine does
        zero = ds["zero_optimization"]
        if int(zero["stage"]) in (1, 2):
            return _zero12(layout, zero, rank, BYTES[cfg.precision])
        return _zero3(layout, zero, BYTES[cfg.precision])


def _groups(tensors: list[Tensor]) -> list[list[Tensor]]:
    """The trainable tensors by param group (optim.param_groups: decayed matrices, then the rest)."""
    decay = [t for t in tensors if t.requires_grad and t.decay]
    rest = [t for t in tensors if t.requires_grad and not t.decay]
    return [g for g in (decay, rest) if g]


def _zero12(layout: Layout, zero: dict[str, Any], rank: int, lp: int) -> StateBytes:
    """ZeRO-1/2: one flat buffer per param group (the module's parameters are views into it), the fp32
    partition and AdamW's moments of this rank's share, the gradients of every whole parameter that
    overlaps it, and the reduce bucket. `lp`: bytes of the module's own dtype (bf16/fp16 modes cast it)."""
    world, p, g, o = layout.world, 0, 0, 0
    for group in _groups(layout.tensors):
        flat = ceil_div(sum(t.numel for t in group), ZERO_ALIGN * world) * ZERO_ALIGN * world
        part = flat // world
        p += flat * lp
        lo, hi, start = rank * part, (rank + 1) * part, 0
        for t in group:
            if start < hi and start + t.numel > lo:
                g += t.numel * lp
            start += t.numel
        o += part * 4 + ADAM_MOMENTS * 4 * part + STEP_BYTES  # fp32 partition (even in fp32), moments, a step
    p += sum(t.numel for t in layout.tensors if not t.requires_grad) * lp
    buffers = int(zero.get("reduce_bucket_size", 5e8)) * lp  # the reduce (ipg) bucket
    if offload_on(zero, "offload_optimizer"):
        return StateBytes(p, 0, 0, buffers, host=o + g)
    return StateBytes(p, g, o, buffers)


def _zero3(layout: Layout, zero: dict[str, Any], lp: int) -> StateBytes:
    """ZeRO-3: each parameter padded to the world size and partitioned; small ones also whole on every
    rank; what DeepSpeed keeps gathered and prefetches; the step's per-sub-group temporaries."""
    tensors, world = layout.tensors, layout.world
    off_opt, off_param = offload_on(zero, "offload_optimizer"), offload_on(zero, "offload_param")
    threshold = int(zero.get("stage3_param_persistence_threshold", 1e5))
    part_total = sum(ceil_div(t.numel, world) for t in tensors)
    persistent = sum(t.numel for t in tensors if t.numel <= threshold)  # small parameters stay whole too
    nonpersistent = sum(t.numel for t in tensors if t.numel > threshold)
    trainable_part = sum(ceil_div(t.numel, world) for t in tensors if t.requires_grad)
    p = (part_total + persistent) * lp
    g = trainable_part * lp  # grad_partitions_flat_buffer
    # fp32 master partition: in fp32 without offload the engine makes it share the parameters'
    # partition (engines.deepspeed_zero._share_fp32_master), otherwise a copy; moments, steps.
    master = 0 if (lp == 4 and not off_opt and not off_param) else trainable_part * 4
    o = master + ADAM_MOMENTS * 4 * trainable_part + STEP_BYTES * len(_groups(tensors))
    big = {t.name: t.numel for t in tensors if t.numel > threshold}
    gathered_max = max((sum(big.get(n, 0) for n in names) for names in units(layout.model)), default=0)
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    live = int(zero.get("stage3_max_live_parameters", 1e9))
    # From the second step on DeepSpeed follows the recorded module order and keeps parameters it
    # will reuse gathered, up to stage3_max_live_parameters, plus the prefetch bucket.
    gathered = (min(nonpersistent, max(live, gathered_max)) + min(prefetch, nonpersistent)) * lp
    # The step, one sub-group at a time: the flattened fp32 gradient copy and AdamW's temporary.
    step_tmp = 0 if off_opt else 2 * min(int(zero.get("sub_group_size", 1e9)), trainable_part) * 4
    buffers = gathered + int(zero.get("reduce_bucket_size", 5e8)) * lp + step_tmp
    host = 0
    if off_opt:
        host, o, g = o + g, 0, 0
    if off_param:
        host, p = host + part_total * lp, p - part_total * lp
    return StateBytes(p, g, o, buffers, host=host)
