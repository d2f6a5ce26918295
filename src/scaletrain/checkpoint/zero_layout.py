"""Where each parameter's fp32 master copy sits in DeepSpeed ZeRO optimizer files.

ZeRO-1/2: per parameter group, the parameters are laid end to end (each followed by its alignment
padding, when the file records one) in one flat vector; rank r's file holds the r-th equal slice of it
(`single_partition_of_fp32_groups`).
ZeRO-3:   every parameter is split on its own into `ceil(numel / world)` elements per rank (the last
rank padded); rank r's file holds its piece of every parameter, end to end (`fp32_flat_groups`).
Frozen parameters live in the model states files (whole for ZeRO-1/2, one piece per rank for ZeRO-3).

`plan(...).fill(write)` opens one rank's file at a time and hands out `write(name, first_element,
piece)`; only that file's fp32 partition is touched. Format as written by deepspeed 0.16-0.19
(deepspeed/utils/zero_to_fp32.py reads the same fields).

Imports: torch, `scaletrain.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaletrain.errors import CheckpointError

Write = Callable[[str, int, torch.Tensor], None]
Loader = Callable[[Path], dict[str, Any]]


@dataclass
class ZeroPlan:
    stage: int
    world: int
    shapes: dict[str, tuple[int, ...]]  # trainable then frozen parameters, in file order
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    fill: Callable[[Write], None] = lambda write: None


def _optim_state(path: Path, load: Loader) -> dict[str, Any]:
    sd = load(path).get("optimizer_state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no optimizer_state_dict: not a ZeRO optimizer file")
    return sd


def _world(first: dict[str, Any]) -> int:
    count = first.get("partition_count")
    return max(count) if isinstance(count, list) else int(count)


def plan(states: dict[str, Any], optim_files: list[Path], stage3_models: list[Path], load: Loader) -> ZeroPlan:
    first = _optim_state(optim_files[0], load)
    world = _world(first)
    if world != len(optim_files):
        raise CheckpointError(f"{optim_files[0].parent}: {len(optim_files)} optimizer files for a world of {world}; "
                              "the checkpoint is incomplete")
    buffer_names = set(states.get("buffer_names") or [])
    buffers = {k: v for k, v in (states.get("module") or {}).items() if k in buffer_names}
    groups = [{n: tuple(s) for n, s in g.items()} for g in states["param_shapes"]]
    frozen = {n: tuple(s) for n, s in (states.get("frozen_param_shapes") or {}).items()}
    shapes = {n: s for g in groups for n, s in g.items()} | frozen
    if "single_partition_of_fp32_groups" in first:
        paddings = first.get("param_alignment_paddings")
        stage_args = getattr(first.get("zero_stage"), "args", None)  # ZeroStageEnum(n), read as a stand-in
        stage = int(stage_args[0]) if stage_args else 2

        def fill(write: Write) -> None:
            _fill_zero12(groups, paddings, optim_files, load, write)
            for name, frag in (states.get("frozen_param_fragments") or {}).items():
                write(name, 0, frag.reshape(-1).float())

        return ZeroPlan(stage, world, shapes, buffers, fill)
    if "fp32_flat_groups" in first:
        if len(stage3_models) != world:
            raise CheckpointError(f"{optim_files[0].parent}: {len(stage3_models)} ZeRO-3 model states files for a "
                                  f"world of {world}; the checkpoint is incomplete")

        def fill3(write: Write) -> None:
            merged = {n: s for g in groups for n, s in g.items()}
            _fill_zero3(merged, optim_files, world, load, write)
            if frozen:
                for rank, path in enumerate(stage3_models):
                    frags = load(path).get("frozen_param_fragments") or {}
                    for name, shape in frozen.items():
                        _write_piece3(write, name, math.prod(shape), world, rank, frags[name].reshape(-1))

        return ZeroPlan(3, world, shapes, buffers, fill3)
    raise CheckpointError(f"{optim_files[0]}: neither ZeRO-1/2 nor ZeRO-3 fp32 partitions found")


def _fill_zero12(groups: list[dict[str, tuple[int, ...]]], paddings: list[list[int]] | None,
                 optim_files: list[Path], load: Loader, write: Write) -> None:
    starts: list[list[tuple[str, int, int]]] = []  # per group: (name, first flat element, numel)
    for g, shapes in enumerate(groups):
        pos, spans = 0, []
        pads = paddings[g] if paddings else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise CheckpointError(f"ZeRO file: {len(pads)} alignment paddings for {len(shapes)} parameters in group {g}")
        for (name, shape), pad in zip(shapes.items(), pads):
            spans.append((name, pos, math.prod(shape)))
            pos += math.prod(shape) + pad
        starts.append(spans)
    for rank, path in enumerate(optim_files):
        parts = _optim_state(path, load)["single_partition_of_fp32_groups"]
        if len(parts) != len(groups):
            raise CheckpointError(f"{path}: {len(parts)} fp32 groups, the model states list {len(groups)}")
        for spans, part in zip(starts, parts):
            lo_r, hi_r = rank * part.numel(), (rank + 1) * part.numel()
            for name, start, numel in spans:
                lo, hi = max(start, lo_r), min(start + numel, hi_r)
                if lo < hi:
                    write(name, lo - start, part[lo - lo_r:hi - lo_r].float())
        del parts  # drop this rank's mapping before opening the next


def _write_piece3(write: Write, name: str, numel: int, world: int, rank: int, piece: torch.Tensor) -> None:
    per_rank = math.ceil(numel / world)
    first = rank * per_rank
    valid = max(0, min(per_rank, numel - first))
    if valid:
        write(name, first, piece[:valid].float())


def _fill_zero3(shapes: dict[str, tuple[int, ...]], optim_files: list[Path], world: int, load: Loader,
                write: Write) -> None:
    for rank, path in enumerate(optim_files):
        flat_groups = _optim_state(path, load)["fp32_flat_groups"]
        bounds = [0]
        for t in flat_groups:
            bounds.append(bounds[-1] + t.numel())
        offset = 0
        for name, shape in shapes.items():
            per_rank = math.ceil(math.prod(shape) / world)
            piece = _slice_groups(flat_groups, bounds, offset, per_rank)
            _write_piece3(write, name, math.prod(shape), world, rank, piece)
            offset += per_rank
        if offset != bounds[-1]:
            raise CheckpointError(f"{path}: fp32 partition holds {bounds[-1]} elements, the shapes need {offset}")
        del flat_groups


def _slice_groups(groups: list[torch.Tensor], bounds: list[int], start: int, length: int) -> torch.Tensor:
    """Elements [start, start+length) of the groups laid end to end (a parameter may cross a group end)."""
    pieces = []
    for g, t in enumerate(groups):
        lo, hi = max(start, bounds[g]), min(start + length, bounds[g + 1])
        if lo < hi:
            pieces.append(t[lo - bounds[g]:hi - bounds[g]])
    if sum(p.numel() for p in pieces) != length:
        raise CheckpointError(f"ZeRO-3 partition ends before element {start + length}; the file is truncated")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
