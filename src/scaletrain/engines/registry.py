"""The backend registry: what the loop and the CLI must not know about any one backend.

Each backend registers `validate(cfg, world_size)` (run on every rank before any process group
exists, so bad input fails identically everywhere), `build(spec, cfg)` (imports its engine module
only when chosen, so a DDP run never imports deepspeed) and the checkpoint format it writes. Adding
a backend is its own engine file plus one entry in `BACKENDS`.

Backend specs are the one short spelling every command uses for a backend (lists of backends to
compare, a conversion target):

    ddp                       DistributedDataParallel
    fsdp[:STRATEGY]           FSDP2; STRATEGY = full_shard (default) | shard_grad_op | hybrid_shard | no_shard
    tp:N                      N-way tensor parallel, FSDP over the remaining ranks (world / N)
    deepspeed[:STAGE]         ZeRO stage 1, 2 (default) or 3
    ...+offload               suffix: optimizer state (ZeRO, FSDP) and, at ZeRO-3, parameters on the CPU

`spec_overrides("fsdp:hybrid_shard")` gives the config overrides a spec stands for; `spec_of(cfg)`
names a config's backend the same way (recorded in meta.json). Imports: `scaletrain.config`,
`scaletrain.errors`; `scaletrain.engines.ds_config`, `scaletrain.engines.tensor_parallel` and `scaletrain.engines` (torch)
only inside functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from scaletrain.config import Config, FSDPConfig
from scaletrain.errors import ConfigError

if TYPE_CHECKING:
    from scaletrain.engines.base import Engine, EngineSpec

FSDP_STRATEGIES: tuple[str, ...] = get_args(FSDPConfig.model_fields["sharding"].annotation)
# Help of the launcher flag that selects DeepSpeed with a JSON file (`--ds FILE`), kept with the backends.
DS_FLAG_HELP = "DeepSpeed JSON: selects backend=deepspeed with that config (see ds_configs/)"
SPEC_HELP = "ddp, fsdp[:full_shard|shard_grad_op|hybrid_shard|no_shard], tp:N, deepspeed[:1|2|3], each optionally +offload"


@dataclass(frozen=True)
class Backend:
    name: str
    validate: Callable[[Config, int], None]
    build: Callable[[EngineSpec, Config], Engine]
    checkpoint_format: Callable[[Config], str]  # what meta.json records and consolidate reads


# ---------------------------------------------------------------------------------------------
# validation (pure: no torch, no process group)


def _validate_torch(cfg: Config, world_size: int) -> None:
    tp = cfg.backend.tp_size
    if world_size % tp:
        raise ConfigError(f"backend.tp_size ({tp}) must divide the world size ({world_size})")
    if tp > 1 and cfg.backend.kind != "fsdp":
        raise ConfigError(f"backend.tp_size={tp} composes with backend=fsdp (FSDP over the data-parallel "
                          f"ranks), not backend={cfg.backend.kind}; use backend=fsdp or the spec tp:{tp}")
    if tp > 1 and cfg.model.factory is None:
        from scaletrain.engines.tensor_parallel import validate_builtin

        validate_builtin(cfg.model.n_head, cfg.model.n_embd, tp, world_size)


def _validate_fsdp(cfg: Config, world_size: int) -> None:
    _validate_torch(cfg, world_size)
    fsdp, dp = cfg.backend.fsdp, world_size // cfg.backend.tp_size
    if fsdp.sharding == "hybrid_shard" and fsdp.shard_group_size and dp % fsdp.shard_group_size:
        raise ConfigError(f"backend.fsdp.shard_group_size ({fsdp.shard_group_size}) must divide the data-parallel "
                          f"size ({dp}); set it to a divisor, e.g. the GPUs per node")


def _validate_deepspeed(cfg: Config, world_size: int) -> None:
    if cfg.backend.tp_size > 1:
        raise ConfigError("backend.tp_size > 1 is not supported with backend=deepspeed; use backend=fsdp for "
                          "tensor parallel")
    from scaletrain.engines.ds_config import resolve_ds_config

    resolve_ds_config(cfg, world_size=world_size)  # its JSON's "auto" values and conflicts


# ---------------------------------------------------------------------------------------------
# builders (collective: wrapping a model is collective under every backend)


def _build_ddp(spec: EngineSpec, cfg: Config) -> Engine:
    from scaletrain.engines.torch_native import TorchNativeEngine

    return TorchNativeEngine(spec, ddp=cfg.backend.ddp, tp_size=cfg.backend.tp_size)


def _build_fsdp(spec: EngineSpec, cfg: Config) -> Engine:
    from scaletrain.engines.torch_native import TorchNativeEngine

    return TorchNativeEngine(spec, fsdp=cfg.backend.fsdp, tp_size=cfg.backend.tp_size)


def _build_deepspeed(spec: EngineSpec, cfg: Config) -> Engine:
    from scaletrain.engines.deepspeed_zero import DeepSpeedEngine
    from scaletrain.engines.ds_config import resolve_ds_config

    def resolve(hidden_size: int | None = None) -> dict:
        return resolve_ds_config(cfg, world_size=spec.ctx.world_size, hidden_size=hidden_size)

    return DeepSpeedEngine(spec, cfg.backend.deepspeed, resolve, cfg.optim)


BACKENDS: dict[str, Backend] = {
    "ddp": Backend("ddp", _validate_torch, _build_ddp, lambda cfg: cfg.checkpoint.format),
    "fsdp": Backend("fsdp", _validate_fsdp, _build_fsdp, lambda cfg: cfg.checkpoint.format),
    "deepspeed": Backend("deepspeed", _validate_deepspeed, _build_deepspeed, lambda cfg: "deepspeed"),
}


def backend(cfg: Config) -> Backend:
    return BACKENDS[cfg.backend.kind]


def validate(cfg: Config, world_size: int) -> None:
    """Everything a backend can check before any process group exists. Raises ConfigError."""
    backend(cfg).validate(cfg, world_size)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Ranks that each read their own share of the global batch (the others hold model shards)."""
    return world_size // cfg.backend.tp_size


def data_parallel_rank(cfg: Config, rank: int) -> int:
    """The share of the global batch that `rank` reads: ranks of one model-parallel group (neighbours
    on the mesh's innermost dimension) read the same one."""
    return rank // cfg.backend.tp_size


def build_engine(spec: EngineSpec, cfg: Config) -> Engine:
    """Collective."""
    return backend(cfg).build(spec, cfg)


# ---------------------------------------------------------------------------------------------
# backend specs


def _bad_spec(spec: str, why: str) -> ConfigError:
    return ConfigError(f"backend spec {spec!r}: {why}; valid specs: {SPEC_HELP}")


def spec_overrides(spec: str) -> dict[str, Any]:
    """The dotted config overrides a backend spec stands for, e.g. {"backend.kind": "fsdp", ...}."""
    text = spec.strip().lower()
    text, offload = (text[: -len("+offload")], True) if text.endswith("+offload") else (text, False)
    kind, _, arg = text.partition(":")
    out: dict[str, Any] = {}
    if kind == "ddp" and not arg:
        out["backend.kind"] = "ddp"
        if offload:
            raise _bad_spec(spec, "ddp has no offload")
    elif kind == "fsdp":
        if arg and arg not in FSDP_STRATEGIES:
            raise _bad_spec(spec, f"unknown FSDP strategy {arg!r}")
        out = {"backend.kind": "fsdp", "backend.fsdp.sharding": arg or "full_shard"}
        if offload:
            out["backend.fsdp.cpu_offload"] = True
    elif kind == "tp":
        if not arg.isdigit() or int(arg) < 1:
            raise _bad_spec(spec, "tp needs a size, e.g. tp:2")
        out = {"backend.kind": "fsdp", "backend.tp_size": int(arg)}
        if offload:
            out["backend.fsdp.cpu_offload"] = True
    elif kind == "deepspeed":
        if arg and arg not in ("1", "2", "3"):
            raise _bad_spec(spec, f"unknown ZeRO stage {arg!r}")
        out = {"backend.kind": "deepspeed", "backend.deepspeed.stage": int(arg or 2)}
        if offload:
            out["backend.deepspeed.offload_optimizer"] = True
            out["backend.deepspeed.offload_param"] = int(arg or 2) == 3
    else:
        raise _bad_spec(spec, "unknown backend")
    return out


def spec_of(cfg: Config) -> str:
    """The canonical spec of a config's backend: `ddp`, `fsdp:hybrid_shard`, `tp:2`, `deepspeed:3+offload`."""
    b = cfg.backend
    if b.kind == "ddp":
        return "ddp"
    if b.kind == "fsdp":
        base = f"tp:{b.tp_size}" if b.tp_size > 1 else f"fsdp:{b.fsdp.sharding}"
        return base + ("+offload" if b.fsdp.cpu_offload else "")
    ds = b.deepspeed
    stage, offload = (ds.stage if ds.stage is not None else 2), bool(ds.offload_optimizer)
    if ds.config is not None:
        from scaletrain.engines.ds_config import offload_on, read_ds_json

        zero = read_ds_json(ds.config).get("zero_optimization", {})
        stage = ds.stage if ds.stage is not None else zero.get("stage", 2)
        offload = ds.offload_optimizer if ds.offload_optimizer is not None else offload_on(zero, "offload_optimizer")
    return f"deepspeed:{stage}" + ("+offload" if offload else "")
