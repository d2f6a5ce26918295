"""What one backend declares, in one object: the base class every backend module subclasses.

A backend is registered with `scaletrain.engines.registry.register(backend)`. It declares:

  kind                 its `backend.kind` value, and the name of its own config section
  config_section       the pydantic model of `backend.<kind>.*` (None: it has none)
  spec_words           the first word of the specs it reads (`fsdp` and `tp` for the FSDP backend)
  spec_help            its part of the spec grammar's help line
  default_specs        the specs `scaletrain plan` lists when no --backends are given
  spec_resets          the keys its specs may set, at the value a spec that does not set them means
  fixed_world          None, or why its checkpoints hold one partition per rank (convert needs --world)

and implements `parse_spec`, `spec_of`, `validate` (pure: no torch, no process group), `build`
(collective: imports torch and its engine module only then), `checkpoint_format`, and `plan` (the
bytes one rank holds, `scaletrain.engines.memory`). Imports: `scaletrain.config`, `scaletrain.errors`,
`scaletrain.engines.memory`, `scaletrain.engines.base` (types only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from scaletrain.config import Config
from scaletrain.config.schema import Section
from scaletrain.engines.memory import Layout, StateBytes
from scaletrain.errors import ConfigError

if TYPE_CHECKING:
    from scaletrain.engines.base import Engine, EngineSpec


class SpecError(ValueError):
    """Why a spec's argument is wrong; the registry adds the spec and the grammar to the message."""


class Backend:
    """One backend. Subclasses set the class attributes and override what differs."""

    kind: ClassVar[str]
    config_section: ClassVar[type[Section] | None] = None
    spec_words: ClassVar[tuple[str, ...]] = ()
    spec_help: ClassVar[str] = ""
    default_specs: ClassVar[tuple[str, ...]] = ()
    spec_resets: ClassVar[dict[str, Any]] = {}
    fixed_world: ClassVar[str | None] = None

    def parse_spec(self, word: str, arg: str, offload: bool) -> dict[str, Any]:
        """The dotted overrides `word[:arg][+offload]` stands for. Raises SpecError."""
        if arg:
            raise SpecError(f"{word} takes no argument")
        if offload:
            raise SpecError(f"{word} has no offload")
        return {"backend.kind": self.kind}

    def spec_of(self, cfg: Config) -> str:
        """The canonical spec of `cfg` (recorded in meta.json); cheap, called once per run."""
        return self.kind

    def validate(self, cfg: Config, world_size: int) -> None:
        """Everything this backend can check before any process group exists. Raises ConfigError."""

    def build(self, spec: EngineSpec, cfg: Config) -> Engine:
        """Collective: the engine over the model, wrapped as this backend wraps it."""
        raise NotImplementedError

    def checkpoint_format(self, cfg: Config) -> str:
        """What meta.json records as `format` and `consolidate` reads: "sharded", "full", ..."""
        return cfg.checkpoint.format

    def plan(self, layout: Layout, rank: int) -> StateBytes:
        """The bytes `rank` holds (docs/plan.md)."""
        raise NotImplementedError

    def plan_ranks(self, world: int) -> Sequence[int]:
        """The ranks that may hold the most (the planner reports the largest of them)."""
        return sorted({0, world - 1})

    def activation_checkpointing(self, cfg: Config) -> bool:
        """Whether block activations are recomputed in backward (the planner counts them so)."""
        return False


def check_tp_divides(cfg: Config, world_size: int) -> None:
    tp = cfg.backend.tp_size
    if world_size % tp:
        raise ConfigError(f"backend.tp_size ({tp}) must divide the world size ({world_size})")
