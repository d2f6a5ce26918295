"""Readers that stream model weights out of any checkpoint format, a bounded piece at a time.

A reader lists the model's tensors up front (`entries`: canonical name -> shape, aliases of tied
weights left out and named in `aliases`) and then `fill(write)` hands over the data as pieces:
`write(name, first_element, flat_fp_tensor)`. The writer (see `consolidate`) places each piece at its
final position, so nothing needs the whole model in memory:

full       `<tag>/model.pt`: mapped with mmap, one tensor at a time.
sharded    `<tag>/dcp/`: only the `model.*` entries, loaded in groups of at most `budget` bytes
           without a process group (`no_dist=True`); optimizer entries are never read.
deepspeed  `<tag>/deepspeed/`: the fp32 master partitions, one rank's file at a time (ZeRO-1/2 flat
           groups, ZeRO-3 per-parameter partitions; offload writes the same files). Moments are mapped,
           never read. DeepSpeed pickles a few of its own objects: they are read with
           `weights_only=True` and stand-ins for exactly those classes (`deepspeed_state.load_file`).

Imports: torch, `scaletrain.checkpoint` (`dcp_safe`, `deepspeed_state`, `layout`, `torch_state`,
`zero_layout`), `scaletrain.model.weights`, `scaletrain.errors`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from scaletrain.checkpoint import dcp_safe, deepspeed_state, layout, torch_state
from scaletrain.errors import CheckpointError
from scaletrain.model.weights import canonical_name

Write = Callable[[str, int, torch.Tensor], None]


@dataclass
class Reader:
    format: str
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]]  # canonical name -> (shape, stored dtype)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name left out -> name stored
    fill: Callable[[Write], None] = lambda write: None


def _aliases_from_groups(groups: list[list[str]], names: set[str]) -> dict[str, str]:
    """Tie groups (first name kept) -> {alias: kept}, for names the checkpoint actually has."""
    out = {}
    for group in groups:
        present = [canonical_name(n) for n in group if canonical_name(n) in names]
        out.update({alias: present[0] for alias in present[1:]})
    return out


def _saved_ties(tag_dir: Path) -> list[list[str]]:
    f = tag_dir / torch_state.ENGINE_FILE
    if not f.is_file():
        return []
    groups = torch_state.load_trusted_file(f).get("tied_params", [])
    return [list(map(str, g)) for g in groups]


# ---------------------------------------------------------------------------------------------- full


def full_reader(tag_dir: Path) -> Reader:
    sd = torch_state.load_trusted_file(tag_dir / torch_state.MODEL_FILE)  # mmap: pages read on touch
    tensors = {canonical_name(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    groups = _saved_ties(tag_dir)
    if not groups:  # older checkpoints: torch.save kept the sharing of tied tensors
        seen: dict[tuple, str] = {}
        for name, t in tensors.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                groups.append([seen[key], name])
            else:
                seen[key] = name
    aliases = _aliases_from_groups(groups, set(tensors))
    entries = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items() if n not in aliases}

    def fill(write: Write) -> None:
        for name in entries:
            write(name, 0, tensors[name].reshape(-1))

    return Reader("full", entries, aliases, fill)


# ---------------------------------------------------------------------------------------------- DCP


def dcp_reader(tag_dir: Path, *, budget: int = 256 << 20) -> Reader:
    dcp_dir = tag_dir / torch_state.DCP_DIR
    md = dcp_safe.read_metadata(dcp_dir)
    keys = {
        canonical_name(k[len("model."):]): (k, v)
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    if not keys:
        raise CheckpointError(f"{dcp_dir}: no model.* tensors in the DCP metadata")
    aliases = _aliases_from_groups(_saved_ties(tag_dir), set(keys))
    entries = {n: (tuple(v.size), v.properties.dtype) for n, (_, v) in keys.items() if n not in aliases}

    def load_group(names: list[str], write: Write) -> None:
        state = {keys[n][0]: torch.empty(entries[n][0], dtype=entries[n][1]) for n in names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, storage_reader=dcp_safe.SafeFileSystemReader(str(dcp_dir)),
                     planner=dcp_safe.SafeLoadPlanner(), no_dist=True)
        for n in names:
            write(n, 0, state[keys[n][0]].reshape(-1))

    def fill(write: Write) -> None:
        group: list[str] = []
        size = 0
        for name, (shape, dtype) in entries.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if group and size + nbytes > budget:
                load_group(group, write)
                group, size = [], 0
            group.append(name)
            size += nbytes
        if group:
            load_group(group, write)

    return Reader("sharded", entries, aliases, fill)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", path.name)
    return int(m.group(1)) if m else -1


def _deepspeed_files(ds_dir: Path) -> tuple[Path, list[Path], list[Path]]:
    optim = sorted(ds_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not optim:
        raise CheckpointError(f"{ds_dir}: no *zero_pp_rank_*_optim_states.pt files (not a ZeRO checkpoint)")
    stage3_models = sorted(ds_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                           key=lambda p: int(p.name.split("_")[3]))
    model = ds_dir / "mp_rank_00_model_states.pt"
    if not model.is_file() and not stage3_models:
        raise CheckpointError(f"{ds_dir}: no DeepSpeed model states file")
    return (model if model.is_file() else stage3_models[0]), optim, stage3_models


def deepspeed_reader(tag_dir: Path) -> Reader:
    from scaletrain.checkpoint import zero_layout

    ds_dir = tag_dir / layout.DEEPSPEED_DIR
    model_file, optim_files, stage3_models = _deepspeed_files(ds_dir)
    states = deepspeed_state.load_file(model_file)
    plan = zero_layout.plan(states, optim_files, stage3_models, deepspeed_state.load_file)
    shapes = {canonical_name(n): tuple(s) for n, s in plan.shapes.items()}
    aliases = {canonical_name(a): canonical_name(b) for a, b in (states.get("shared_params") or {}).items()}
    aliases = {a: b for a, b in aliases.items() if b in shapes and a not in shapes}
    entries = {n: (s, torch.float32) for n, s in shapes.items()}
    for name, t in plan.buffers.items():
        entries[canonical_name(name)] = (tuple(t.shape), t.dtype)

    def fill(write: Write) -> None:
        for name, t in plan.buffers.items():
            write(canonical_name(name), 0, t.reshape(-1))
        plan.fill(lambda n, off, piece: write(canonical_name(n), off, piece))

    return Reader(f"deepspeed-zero{plan.stage}", entries, aliases, fill)


# ---------------------------------------------------------------------------------------------- opening


def open_reader(tag_dir: Path) -> Reader:
    kind = layout.detect_format(tag_dir)
    if kind == "deepspeed":
        return deepspeed_reader(tag_dir)
    return dcp_reader(tag_dir) if kind == "sharded" else full_reader(tag_dir)
