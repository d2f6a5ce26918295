"""FSDP2 (`fully_shard`) with four sharding strategies, CPU offload and activation checkpointing, and
tensor parallel composed under it (`backend.tp_size`, spec `tp:N`: FSDP over world / N ranks).

Specs `fsdp[:STRATEGY]`, `tp:N`, each with `+offload`; section `backend.fsdp.*`; the torch-native
engine, imported only to build. Imports: `scaletrain.config`, `scaletrain.errors`,
`scaletrain.engines.backends.base`, `scaletrain.engines.memory`, `scaletrain.engines.tensor_parallel` and
`scaletrain.engines.torch_native` (inside functions), `scaletrain.engines.base` (types only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from pydantic import Field

from scaletrain.config import Config
from scaletrain.config.schema import Int, Section
from scaletrain.engines.backends.base import Backend, SpecError, check_tp_divides
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

Sharding = Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"]
STRATEGIES: tuple[str, ...] = get_args(Sharding)


class FSDPConfig(Section):
    sharding: Sharding = "full_shard"
    shard_group_size: Int | None = Field(None, ge=1, description="hybrid_shard: ranks that shard together.")
    cpu_offload: bool = Field(False, description="Parameters, gradients and optimizer state in CPU memory.")
    activation_checkpointing: bool = False
    wrap_classes: tuple[str, ...] = Field(
        (), description="Module class names to shard and checkpoint one by one (default: the model's blocks)."
    )
    param_dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="Compute dtype of parameters (default: from `precision`)."
    )
    reduce_dtype: Literal["bf16", "fp32"] = Field("fp32", description="Dtype of gradient reduction.")


class FSDPBackend(Backend):
    kind = "fsdp"
    config_section = FSDPConfig
    spec_words = ("fsdp", "tp")
    spec_help = f"fsdp[:{'|'.join(STRATEGIES)}], tp:N"
    default_specs = (*(f"fsdp:{s}" for s in STRATEGIES), "fsdp:full_shard+offload", "tp:2")
    # tp:N is FSDP full_shard over the data-parallel ranks; no spec means offload unless it says so.
    spec_resets: ClassVar[dict[str, Any]] = {
        "backend.tp_size": 1, "backend.fsdp.sharding": "full_shard", "backend.fsdp.cpu_offload": False,
    }

    def parse_spec(self, word: str, arg: str, offload: bool) -> dict[str, Any]:
        if word == "tp":
            if not arg.isdigit() or int(arg) < 1:
                raise SpecError("tp needs a size, e.g. tp:2")
            out: dict[str, Any] = {"backend.kind": self.kind, "backend.tp_size": int(arg)}
        else:
            if arg and arg not in STRATEGIES:
                raise SpecError(f"unknown FSDP strategy {arg!r}")
            out = {"backend.kind": self.kind, "backend.fsdp.sharding": arg or "full_shard"}
        if offload:
            out["backend.fsdp.cpu_offload"] = True
        return out

    def spec_of(self, cfg: Config) -> str:
        b = cfg.backend
        base = f"tp:{b.tp_size}" if b.tp_size > 1 else f"fsdp:{b.fsdp.sharding}"
        return base + ("+offload" if b.fsdp.cpu_offload else "")

    def validate(self, cfg: Config, world_size: int) -> None:
        check_tp_divides(cfg, world_size)
        tp = cfg.backend.tp_size
        if tp > 1 and cfg.model.factory is None:
            from scaletrain.engines.tensor_parallel import validate_builtin

            validate_builtin(cfg.model.n_head, cfg.model.n_embd, tp, world_size)
        fsdp, dp = cfg.backend.fsdp, world_size // tp
        if fsdp.sharding == "hybrid_shard" and fsdp.shard_group_size and dp % fsdp.shard_group_size:
            raise ConfigError(f"backend.fsdp.shard_group_size ({fsdp.shard_group_size}) must divide the "
                              f"data-parallel size ({dp}); set it to a divisor, e.g. the GPUs per node")

    def build(self, spec: EngineSpec, cfg: Config) -> Engine:
        from scaletrain.engines.torch_native import TorchNativeEngine

        return TorchNativeEngine(spec, fsdp=cfg.backend.fsdp, tp_size=cfg.backend.tp_size)

    def activation_checkpointing(self, cfg: Config) -> bool:
        return cfg.backend.fsdp.activation_checkpointing

    def plan(self, layout: Layout, rank: int) -> StateBytes:
        """fp32 shards padded to whole dim-0 chunks (AdamW sized by the unpadded rows this rank owns),
        plus the gathered parameters at the peak and one unit's unsharded gradients."""
        cfg, tp = layout.cfg, layout.cfg.backend.tp_size
        f = cfg.backend.fsdp
        shards = _shard_count(f, layout.world // tp, layout.procs_per_node // tp)
        split = _tp_split(layout.model, tp) if tp > 1 else {}
        p = g = o = 0
        local: dict[str, int] = {}
        for t in layout.tensors:
            shape = _local_shape(t, split, tp)
            padded, mine = _fsdp_rows(shape, shards, rank // tp % shards)
            p += padded * 4  # fp32 masters under every torch-native strategy
            local[t.name] = math.prod(shape)
            if t.requires_grad:
                g += padded * 4
                o += ADAM_MOMENTS * 4 * mine + STEP_BYTES
        sizes = [sum(local[n] for n in names) for names in units(layout.model, f.wrap_classes)]
        blocks, root = sizes[:-1], sizes[-1]
        biggest = max(blocks, default=0)
        cbytes = BYTES[f.param_dtype or cfg.precision]  # gathered parameters are in the compute dtype
        # FSDP2 gathers into separate unsharded buffers even over a single shard (it copies the shard in).
        if f.sharding in ("shard_grad_op", "no_shard"):
            gathered = sum(sizes) * cbytes  # every unit stays gathered from its forward to its backward
        else:  # full_shard, hybrid_shard: the root, the block in use and the one prefetched
            gathered = (root + min(2, len(blocks)) * biggest) * cbytes
        reduce = (biggest or root) * BYTES[f.reduce_dtype]  # one unit's unsharded gradients before reduction
        if f.cpu_offload:
            return StateBytes(0, 0, 0, gathered + reduce, host=p + g + o)
        return StateBytes(p, g, o, gathered + reduce)


def _shard_count(f: FSDPConfig, dp: int, procs_per_node: int) -> int:
    if f.sharding == "no_shard":
        return 1
    if f.sharding != "hybrid_shard":
        return dp
    shards = f.shard_group_size or max(procs_per_node, 1)
    if dp % shards:
        raise ConfigError(f"backend.fsdp.shard_group_size ({shards}) must divide the data-parallel size ({dp}); "
                          "set it (or --procs-per-node) to a divisor")
    return shards


def _tp_split(model: Any, tp: int) -> dict[str, int]:
    """Parameter name -> the dim tensor parallel splits (colwise: 0 for weight and bias; rowwise: 1)."""
    from scaletrain.engines.tensor_parallel import model_plan, resolve_plan

    split = {}
    for module, style in resolve_plan(model, model_plan(model), tp).items():
        split[f"{module}.weight"] = 0 if style == "colwise" else 1
        if style == "colwise":
            split[f"{module}.bias"] = 0
    return split


def _local_shape(t: Tensor, split: dict[str, int], tp: int) -> tuple[int, ...]:
    if t.name not in split or tp == 1:
        return t.shape
    d = split[t.name]
    return tuple(n // tp if i == d else n for i, n in enumerate(t.shape))


def _fsdp_rows(shape: tuple[int, ...], shards: int, rank: int) -> tuple[int, int]:
    """(padded elements, this rank's unpadded elements) of FSDP2's dim-0 shard."""
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    d0 = shape[0] if shape else 1
    chunk = ceil_div(d0, shards)
    mine = min(chunk, max(0, d0 - rank * chunk))
    return chunk * rest, mine * rest
