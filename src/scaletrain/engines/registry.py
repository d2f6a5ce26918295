"""The backend registry: it collects backends, and nothing else here knows one from another.

Each backend is one object (`scaletrain.engines.backends.base.Backend`) in its own module that declares
its spec grammar, its config section, `validate(cfg, world_size)` (pure, before any process group),
`build(spec, cfg)` (collective; imports torch and its engine module only then, so a DDP run never
imports deepspeed), its memory planner and its checkpoint format. Adding a backend is one module and
one `register(MyBackend())` call, from anywhere (a test registers a toy one); the built-ins (`ddp`,
`fsdp` with tensor parallel, `deepspeed`) register when this module is imported.

How the config schema learns the backends without the ground floor importing engines: `register`
hands the backend's kind and section to `scaletrain.config.schema.add_backend`, which rebuilds the
`backend` section in place (`backend.kind` takes the registered kinds; `backend.<kind>.*` is the
backend's own model). So that every `load_config` / `build_config` sees the built-ins, the package's
own `scaletrain/__init__.py`, the top of the layering (with `cli` and `api`) and the one module every
import of scaletrain runs first, imports this module. That import points down; config never names
engines, and this module and the backend modules import no torch at import time.

Backend specs are the one short spelling every command uses for a backend (lists of backends to
compare, a conversion target); `SPEC_HELP` gathers each backend's part:

    ddp                       DistributedDataParallel
    fsdp[:STRATEGY]           FSDP2; STRATEGY = full_shard (default) | shard_grad_op | hybrid_shard | no_shard
    tp:N                      N-way tensor parallel, FSDP over the remaining ranks (world / N)
    deepspeed[:STAGE]         ZeRO stage 1, 2 (default) or 3
    ...+offload               suffix: optimizer state (ZeRO, FSDP) and, at ZeRO-3, parameters on the CPU

`spec_overrides("fsdp:hybrid_shard")` gives the config overrides a spec stands for; `spec_of(cfg)`
names a config's backend the same way (recorded in meta.json; a run resolves it once). Imports:
`scaletrain.config`, `scaletrain.errors`, `scaletrain.engines.backends` (`base`, `ddp`, `fsdp`,
`deepspeed`), `scaletrain.engines.base` (types only).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from scaletrain.config import Config
from scaletrain.config import schema as _schema
from scaletrain.engines.backends import ddp as _ddp
from scaletrain.engines.backends import deepspeed as _deepspeed
from scaletrain.engines.backends import fsdp as _fsdp
from scaletrain.engines.backends.base import Backend, SpecError
from scaletrain.engines.backends.deepspeed import DS_FLAG_HELP as DS_FLAG_HELP  # the `--ds FILE` flag's help
from scaletrain.errors import ConfigError

if TYPE_CHECKING:
    from scaletrain.engines.base import Engine, EngineSpec

# kind -> backend, in registration order; spec word -> backend.
BACKENDS: dict[str, Backend] = {}
_SPEC_WORDS: dict[str, Backend] = {}
OFFLOAD_SUFFIX = "+offload"


def register(new: Backend, *, replace: bool = False) -> Backend:
    """Add a backend: its kind to `backend.kind`, its section to the config, its spec words to the
    grammar. A kind or spec word another backend holds is refused unless `replace=True`."""
    if BACKENDS.get(new.kind) is new:
        return new
    clash = {b for w in (new.kind, *new.spec_words) if (b := BACKENDS.get(w) or _SPEC_WORDS.get(w)) is not None}
    if clash and not replace:
        names = sorted(b.kind for b in clash)
        raise ValueError(f"backend {new.kind!r}: its kind or spec words are taken by {names}; pass replace=True")
    for old in clash:
        unregister(old.kind)
    BACKENDS[new.kind] = new
    _SPEC_WORDS.update(dict.fromkeys(new.spec_words, new))
    _schema.add_backend(new.kind, new.config_section)
    return new


def unregister(kind: str) -> None:
    """Remove a registered backend (tests that register their own clean up with it)."""
    gone = BACKENDS.pop(kind, None)
    for word in [w for w, b in _SPEC_WORDS.items() if b is gone]:
        del _SPEC_WORDS[word]
    _schema.remove_backend(kind)


def backend(cfg: Config) -> Backend:
    return BACKENDS[cfg.backend.kind]


def validate(cfg: Config, world_size: int) -> None:
    """Everything a backend can check before any process group exists. Raises ConfigError."""
    backend(cfg).validate(cfg, world_size)


def build_engine(spec: EngineSpec, cfg: Config) -> Engine:
    """Collective."""
    return backend(cfg).build(spec, cfg)


def checkpoint_format(cfg: Config) -> str:
    """What the configured backend writes (meta.json `format`)."""
    return backend(cfg).checkpoint_format(cfg)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Ranks that each read their own share of the global batch (the others hold model shards)."""
    return world_size // cfg.backend.tp_size


def data_parallel_rank(cfg: Config, rank: int) -> int:
    """The share of the global batch that `rank` reads: ranks of one model-parallel group (neighbours
    on the mesh's innermost dimension) read the same one."""
    return rank // cfg.backend.tp_size


# ---------------------------------------------------------------------------------------------
# backend specs


def spec_help() -> str:
    return ", ".join(b.spec_help for b in BACKENDS.values()) + ", each optionally +offload"


def __getattr__(name: str) -> str:
    if name == "SPEC_HELP":  # computed, so a backend registered later is listed too
        return spec_help()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bad_spec(spec: str, why: str) -> ConfigError:
    return ConfigError(f"backend spec {spec!r}: {why}; valid specs: {spec_help()}")


def _parse(spec: str) -> tuple[Backend, dict[str, Any]]:
    text = spec.strip().lower()
    offload = text.endswith(OFFLOAD_SUFFIX)
    word, _, arg = text.removesuffix(OFFLOAD_SUFFIX).partition(":")
    owner = _SPEC_WORDS.get(word)
    if owner is None:
        raise _bad_spec(spec, "unknown backend")
    try:
        return owner, owner.parse_spec(word, arg, offload)
    except SpecError as e:
        raise _bad_spec(spec, str(e)) from None


def spec_overrides(spec: str) -> dict[str, Any]:
    """The dotted config overrides a backend spec stands for, e.g. {"backend.kind": "fsdp", ...}."""
    return _parse(spec)[1]


def spec_of(cfg: Config) -> str:
    """The canonical spec of a config's backend: `ddp`, `fsdp:hybrid_shard`, `tp:2`, `deepspeed:3+offload`."""
    return backend(cfg).spec_of(cfg)


def spec_tree(tree: dict[str, Any], spec: str) -> dict[str, Any]:
    """A config tree (as `Config.to_json_dict` gives it) with the backend `spec` names, as a whole: every
    key any backend's spec may set starts from what a spec that does not set it means, then the spec's
    own overrides apply. Other settings (the DeepSpeed JSON, FSDP's wrap classes) stay."""
    out = copy.deepcopy(tree)
    resets = {k: v for b in BACKENDS.values() for k, v in b.spec_resets.items()}
    for key, value in {**resets, **spec_overrides(spec)}.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def fixed_world(spec: str) -> str | None:
    """None, or why the checkpoints of `spec`'s backend hold one partition per rank (so a conversion
    to it needs the world size the run will resume on)."""
    return _parse(spec)[0].fixed_world


def default_specs() -> list[str]:
    """What `scaletrain plan` lists without --backends: every registered backend's own list."""
    return [s for b in BACKENDS.values() for s in b.default_specs]


for _builtin in (_ddp.DDPBackend(), _fsdp.FSDPBackend(), _deepspeed.DeepSpeedBackend()):
    register(_builtin)
