"""Building the configured model: the built-in GPT, or a user's `factory` from "pkg.module:function";
and what the engines ask of any model (its size, width and block classes).
Knows nothing of engines. Imports: torch, `scaletrain.config`, `scaletrain.errors`, `scaletrain.hooks`,
`scaletrain.model.gpt`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from scaletrain.config import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.hooks import import_callable
from scaletrain.model.gpt import GPT

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights once), by their global size even when sharded."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions hold their full size here
    return total


def build_model(cfg: ModelConfig, vocab_size: int, factory: Callable[..., Any] | None = None) -> nn.Module:
    """The built-in GPT, or `factory(cfg, vocab_size)` (a factory may take just `cfg`). `factory` is
    `model.factory` already imported (the run plan imports it once); otherwise it is imported here."""
    if cfg.factory is None:
        return GPT(cfg, vocab_size)
    fn = factory or import_callable(cfg.factory, "model.factory")
    n_args = len(inspect.signature(fn).parameters)
    model = fn(cfg, vocab_size) if n_args >= 2 else fn(cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: {cfg.factory} returned {type(model).__name__}, not an nn.Module")
    return model


def hidden_size(model: nn.Module) -> int | None:
    """The model's width: a HuggingFace config's `hidden_size`, else the first embedding's dimension."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(width, int):
        return width
    return next((m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)), None)


def block_classes(model: nn.Module, names: tuple[str, ...] = ()) -> tuple[type[nn.Module], ...]:
    """Classes to shard/checkpoint one by one: by name from config, else the model's `block_classes`."""
    if not names:
        own = tuple(getattr(model, "block_classes", ()))
        if own:
            return own
        # A HuggingFace model names the classes it must not split across devices (its decoder layers).
        no_split = set(getattr(model, "_no_split_modules", None) or ())
        found = {type(m) for m in model.modules() if type(m).__name__ in no_split and m is not model}
        return tuple(sorted(found, key=lambda c: c.__name__))
    found = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in found]
    if missing:
        raise ConfigError(
            f"backend.fsdp.wrap_classes: {missing} match no module of the model; "
            f"its classes are {sorted(found)}"
        )
    return tuple(found[n] for n in names)
