"""Where each parameter's fp32 master copy sits in DeepSpeed ZeRO optimizer files.

ZeRO-1/2: per parameter group, the parameters are laid end to end (each followed by its alignment
padding, when the file records one) in one flat vector; rank r's file holds the r-th equal slice of it
(`single_partition_of_fp32_groups`).
ZeRO-3:   every parameter is split on its own into `ceil(numel / world)` elements per rank (the last
rank padded); rank r's file holds its piece of every parameter, end to end (`fp32_flat_groups`).
Frozen parameters live in the model states files (whole for ZeRO-1/2, one piece per rank for ZeRO-3).

`plan(...).fill(write)` opens one rank's file at a time and hands out `write(name, first_element,
piece)`; only that file's fp32 partition is touched. `ZeroIndex` instead hands out one parameter's
full weight or AdamW moment at a time, from every rank's file kept memory-mapped (cross-backend resume). Format as written by deepspeed 0.16-0.19
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


# ---------------------------------------------------------------------------------------------- by parameter


def _base_state(sd: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The base optimizer's state of each flat group, in group order (ZeRO-1/2: `base_optimizer_state`,
    ZeRO-3: `optimizer_state_dict`; each is a torch optimizer state dict over the flat partitions)."""
    base = sd.get("base_optimizer_state", sd.get("optimizer_state_dict"))
    if not isinstance(base, dict) or "param_groups" not in base:
        raise CheckpointError(f"{path}: no base optimizer state in the ZeRO optimizer file")
    state = base.get("state") or {}
    order = [i for g in base["param_groups"] for i in g["params"]]
    return [state.get(i, {}) for i in order], bool(state)


class ZeroIndex:
    """Any parameter's full fp32 weight or optimizer state (`exp_avg`, `exp_avg_sq`) and step, cut out of
    every rank's flat partitions. The rank files are memory-mapped once and kept open, so reading a
    parameter touches only its own pages; the peak is the one full tensor returned."""

    def __init__(self, states: dict[str, Any], optim_files: list[Path], stage3_models: list[Path],
                 load: Loader) -> None:
        self.files = optim_files
        self.sds = [_optim_state(p, load) for p in optim_files]  # mmap: nothing read yet
        self.world = _world(self.sds[0])
        if self.world != len(optim_files):
            raise CheckpointError(f"{optim_files[0].parent}: {len(optim_files)} optimizer files for a world of "
                                  f"{self.world}; the checkpoint is incomplete")
        groups = [{n: tuple(s) for n, s in g.items()} for g in states["param_shapes"]]
        if states.get("frozen_param_shapes"):
            raise CheckpointError(f"{optim_files[0].parent}: frozen parameters are not carried across backends; "
                                  "resume with the backend that wrote the tag")
        self.shapes = {n: s for g in groups for n, s in g.items()}
        self.base = [_base_state(sd, p) for sd, p in zip(self.sds, optim_files, strict=True)]
        first = self.sds[0]
        # name -> (group, first element in the group's flat vector (ZeRO-1/2) or in each rank's
        # partition (ZeRO-3), element count)
        self.where: dict[str, tuple[int, int, int]] = {}
        if "single_partition_of_fp32_groups" in first:
            stage_args = getattr(first.get("zero_stage"), "args", None)
            self.stage = int(stage_args[0]) if stage_args else 2
            paddings = first.get("param_alignment_paddings")
            for g, shapes in enumerate(groups):
                pos = 0
                pads = paddings[g] if paddings else [0] * len(shapes)
                for (name, shape), pad in zip(shapes.items(), pads, strict=True):
                    self.where[name] = (g, pos, math.prod(shape))
                    pos += math.prod(shape) + pad
        elif "fp32_flat_groups" in first:
            self.stage = 3
            if len(stage3_models) != self.world:
                raise CheckpointError(f"{optim_files[0].parent}: {len(stage3_models)} ZeRO-3 model states files "
                                      f"for a world of {self.world}; the checkpoint is incomplete")
            offset = 0
            for name, shape in self.shapes.items():
                per_rank = math.ceil(math.prod(shape) / self.world)
                self.where[name] = (-1, offset, math.prod(shape))
                offset += per_rank
        else:
            raise CheckpointError(f"{optim_files[0]}: neither ZeRO-1/2 nor ZeRO-3 fp32 partitions found")

    def _flats(self, rank: int, key: str | None) -> list[torch.Tensor]:
        sd = self.sds[rank]
        if key is None:
            return list(sd["single_partition_of_fp32_groups" if self.stage < 3 else "fp32_flat_groups"])
        states, _ = self.base[rank]
        try:
            return [s[key] for s in states]
        except KeyError:
            raise CheckpointError(f"{self.files[rank]}: the optimizer state has no {key!r}; the tag was not written "
                                  "by AdamW") from None

    def has_state(self, name: str, key: str) -> bool:
        states, stepped = self.base[0]
        return stepped and all(key in s for s in states)

    def step(self, name: str) -> float:
        """The step of the flat group holding `name` (ZeRO keeps one per group; 0 before the first step)."""
        states, stepped = self.base[0]
        if not stepped:
            return 0.0
        g = self.where[name][0]
        s = states[g] if g >= 0 else states[0]
        v = s.get("step", 0)
        return float(v.item() if isinstance(v, torch.Tensor) else v)

    @torch.no_grad()
    def read(self, name: str, key: str | None) -> torch.Tensor:
        """The full fp32 tensor of `name`: the weight (`key=None`) or one optimizer state."""
        g, start, numel = self.where[name]
        out = torch.empty(numel, dtype=torch.float32)
        if self.stage < 3:
            for rank in range(self.world):
                part = self._flats(rank, key)[g]
                lo_r, hi_r = rank * part.numel(), (rank + 1) * part.numel()
                lo, hi = max(start, lo_r), min(start + numel, hi_r)
                if lo < hi:
                    out[lo - start:hi - start] = part[lo - lo_r:hi - lo_r]
        else:
            per_rank = math.ceil(numel / self.world)
            for rank in range(self.world):
                flats = self._flats(rank, key)
                bounds = [0]
                for t in flats:
                    bounds.append(bounds[-1] + t.numel())
                first = rank * per_rank
                valid = max(0, min(per_rank, numel - first))
                if valid:
                    out[first:first + valid] = _slice_groups(flats, bounds, start, per_rank)[:valid]
        return out.reshape(self.shapes[name])
