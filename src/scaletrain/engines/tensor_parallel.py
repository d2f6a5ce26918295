"""Tensor parallelism: a model's matrices split across the ranks of the mesh's "tp" dimension.

A plan maps module-name patterns (fnmatch over `named_modules()`) to a style:

    colwise   the Linear's output features are split (weight rows, `Shard(0)`); its input is
              replicated and its output stays local: each rank computes its own heads / hidden units
    rowwise   the Linear's input features are split (weight columns, `Shard(1)`); it takes the local
              output of a colwise layer and ends with one all-reduce, so its output is replicated

A block planned as colwise -> rowwise twice (attention, then MLP) costs two all-reduces in forward
and two in backward. Outputs stay local tensors (`use_local_output=True`): a DTensor output would be
redistributed silently by the next op, e.g. all-gathered, and a replicated attention would pass
parity while doing all the work on every rank.

The plan comes from the model: a `tp_plan` attribute (the built-in GPT has one; its fused q/k/v
matrix is laid out head by head so a row shard holds whole heads), or a HuggingFace model's
`base_model_tp_plan` / `_tp_plan` when it uses only these two styles. Imports: torch, `scaletrain.errors`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from scaletrain.errors import ConfigError

log = logging.getLogger(__name__)

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
_SPLIT_DIM = {"colwise": "out_features", "rowwise": "in_features"}


def model_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan: `tp_plan`, else a HuggingFace one; {} when it has none."""
    plan = getattr(model, "tp_plan", None)
    if plan is not None:
        return dict(plan)
    hf = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
    # HuggingFace names the base model's modules relative to it (`layers.*.self_attn.q_proj`).
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        hf = {f"{prefix}.{k}": v for k, v in hf.items()}
    return dict(hf)


def resolve_plan(model: nn.Module, plan: Mapping[str, str], tp_size: int) -> dict[str, str]:
    """Expand patterns to module names and check each target. Raises ConfigError naming the fix."""
    if not plan:
        raise ConfigError(f"backend.tp_size > 1 needs a tensor-parallel plan: give {type(model).__name__} a "
                          "`tp_plan` attribute, e.g. {'blocks.*.mlp.fc': 'colwise', ...} (see docs/models.md)")
    modules = dict(model.named_modules())
    resolved: dict[str, str] = {}
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ConfigError(f"tp_plan: style {style!r} for {pattern!r} is not supported; use 'colwise' or 'rowwise'")
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise ConfigError(f"tp_plan: pattern {pattern!r} matches no module of {type(model).__name__}; "
                              "fix the model's tp_plan")
        for name in names:
            _check_target(name, modules[name], style, tp_size)
            resolved[name] = style
    return resolved


def _check_target(name: str, module: nn.Module, style: str, tp_size: int) -> None:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"tp_plan: {name} is a {type(module).__name__}; only nn.Linear layers can be split")
    size = getattr(module, _SPLIT_DIM[style])
    if size % tp_size:
        raise ConfigError(f"tp_plan: {name}.{_SPLIT_DIM[style]} ({size}) is not divisible by backend.tp_size "
                          f"({tp_size}); choose a tp_size that divides it")


def validate_builtin(n_head: int, n_embd: int, tp_size: int, world_size: int) -> None:
    """Before any process group: the built-in GPT splits whole heads and MLP units evenly."""
    if world_size % tp_size:
        raise ConfigError(f"backend.tp_size ({tp_size}) must divide the world size ({world_size})")
    for what, n in (("model.n_head", n_head), ("4 * model.n_embd", 4 * n_embd)):
        if n % tp_size:
            raise ConfigError(f"{what} ({n}) must be divisible by backend.tp_size ({tp_size}): tensor parallel "
                              "splits heads and MLP units evenly across ranks")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, str] | None = None) -> None:
    """Collective over `tp_mesh` (parameters are scattered from its first rank unless on `meta`).
    Parallelise `model` in place with `plan`, or the model's own."""
    tp_size = tp_mesh.size()
    resolved = resolve_plan(model, plan if plan is not None else model_plan(model), tp_size)
    styles: dict[str, ParallelStyle] = {name: STYLES[style]() for name, style in resolved.items()}
    parallelize_module(model, tp_mesh, styles)
    log.debug("tensor parallel over %d ranks: %d linear layers split", tp_size, len(styles))
