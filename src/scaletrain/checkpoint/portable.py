"""Resume anywhere: a tag of any backend into an engine of any other, optimizer state included.

A tag written by a PyTorch-native engine (DCP `dcp/`, or full `model.pt` + `optim.pt`) or by DeepSpeed
ZeRO-1/2/3 (with or without offload: the files are the same) is read as one stream of parameters by
canonical name (`weights.canonical_name`): for each, the full fp32 weight, AdamW's `exp_avg` and
`exp_avg_sq`, and its `step`. Parameter order, parameter groups and weight-decay splits may differ
between the backends; only the names are matched.

Reading (`open_source`), never unpickling code:
    DCP        only `model.<name>` and `optim.state.<name>.<key>` entries, loaded without a process group
               (`no_dist=True`) through `dcp_safe`, in groups of at most `budget` bytes.
    full       `model.pt` / `optim.pt` memory-mapped with `weights_only=True`, one tensor at a time.
    DeepSpeed  every rank's `*_optim_states.pt` memory-mapped with `weights_only=True`
               (`deepspeed_state.load_file`); each parameter is cut out of the flat partitions of the
               fp32 master copy and of the base optimizer's moments (`zero_layout.ZeroIndex`), so only
               the pages of that parameter are read. DeepSpeed's own loaders are never called.
Writing, one parameter at a time (every rank reads the files itself; no collective):
    torch-native  this rank's piece of the full tensor (`materialize.local_piece`: a DTensor shard under
                  FSDP/TP, the whole tensor under DDP) copied into the parameter, and the optimizer's
                  state for it built as AdamW would (`exp_avg`, `exp_avg_sq` like the parameter, `step`
                  a float32 scalar).
    DeepSpeed     the ZeRO optimizer's base optimizer keeps one state per flat fp32 partition, created
                  lazily by its first step. `_ensure_zero_state` creates it (zeros, the group's step),
                  links ZeRO-1/2's per-parameter fragments to it (the optimizer's own
                  `_lazy_init_hp_params_optimizer_state`), and then each parameter goes in through
                  DeepSpeed's public `deepspeed.utils.safe_set_full_fp32_param` and
                  `safe_set_full_optimizer_state(param, value, "exp_avg" | "exp_avg_sq")`, which copy this
                  rank's fragment only. The low-precision copy the forward pass uses is set too (the
                  whole parameter under ZeRO-1/2, this rank's `ds_tensor` partition under ZeRO-3).
Peak memory: the three full fp32 tensors of one parameter (a DCP group of at most `budget` bytes).

Imports: torch, `scaletrain.checkpoint` (`dcp_safe`, `deepspeed_state`, `layout`, `readers`,
`torch_state`, `zero_layout`), `scaletrain.model` (`materialize`, `weights`), `scaletrain.errors`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from scaletrain.checkpoint import dcp_safe, deepspeed_state, layout, readers, torch_state, zero_layout
from scaletrain.errors import CheckpointError
from scaletrain.model.weights import canonical_name

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("param", *MOMENTS)


@dataclass
class Entry:
    """One parameter of a tag: full fp32 tensors by KEYS (a moment missing when the tag has none) and its
    step (0 when the optimizer had not stepped)."""

    name: str
    tensors: dict[str, torch.Tensor]
    step: float


@dataclass
class Source:
    """A tag read as parameters by canonical name. `read(names)` yields Entries in the order asked."""

    path: Path
    kind: str  # "sharded", "full", "deepspeed-zero1/2/3"
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str] = field(default_factory=dict)  # a tied name left out -> the name stored
    read: Callable[[list[str]], Iterator[Entry]] = lambda names: iter(())

    def stored_name(self, names: list[str]) -> str | None:
        """The name the tag holds for a (possibly tied) parameter known by `names`."""
        for n in names:
            if n in self.shapes:
                return n
        for n in names:
            if self.aliases.get(n) in self.shapes:
                return self.aliases[n]
        return None


def _step_value(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


# ---------------------------------------------------------------------------------------------- DCP


def _dcp_source(tag_dir: Path, budget: int) -> Source:
    dcp_dir = tag_dir / torch_state.DCP_DIR
    md = dcp_safe.read_metadata(dcp_dir).state_dict_metadata
    tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
    model = {canonical_name(k[len("model."):]): k for k in tensors if k.startswith("model.")}
    optim: dict[str, dict[str, str]] = {}
    for k in tensors:
        if k.startswith("optim.state."):
            fqn, _, key = k[len("optim.state."):].rpartition(".")
            if key in (*MOMENTS, "step"):
                optim.setdefault(canonical_name(fqn), {})[key] = k
    if not model:
        raise CheckpointError(f"{dcp_dir}: no model.* tensors in the DCP metadata; not a scaletrain tag")
    aliases = readers._aliases_from_groups(readers._saved_ties(tag_dir), set(model))
    shapes = {n: tuple(tensors[k].size) for n, k in model.items() if n not in aliases}

    def keys_of(name: str) -> dict[str, str]:
        return {"param": model[name], **optim.get(name, {})}

    def load(names: list[str]) -> Iterator[Entry]:
        state = {}
        for n in names:
            for k in keys_of(n).values():
                state[k] = torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, storage_reader=dcp_safe.SafeFileSystemReader(str(dcp_dir)),
                     planner=dcp_safe.SafeLoadPlanner(), no_dist=True)
        for n in names:
            keys = keys_of(n)
            out = {key: state[k].float() for key, k in keys.items() if key != "step"}
            yield Entry(n, out, _step_value(state[keys["step"]]) if "step" in keys else 0.0)

    def read(names: list[str]) -> Iterator[Entry]:
        group: list[str] = []
        size = 0
        for name in names:
            nbytes = 3 * 4 * math.prod(shapes[name])
            if group and size + nbytes > budget:
                yield from load(group)
                group, size = [], 0
            group.append(name)
            size += nbytes
        if group:
            yield from load(group)

    return Source(tag_dir, "sharded", shapes, aliases, read)


# ---------------------------------------------------------------------------------------------- full


def _full_source(tag_dir: Path) -> Source:
    model_sd = torch_state.load_trusted_file(tag_dir / torch_state.MODEL_FILE)  # mmap: pages read on touch
    optim_sd = torch_state.load_trusted_file(tag_dir / torch_state.OPTIM_FILE)
    model = {canonical_name(k): v for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    state = {canonical_name(str(k)): v for k, v in (optim_sd.get("state") or {}).items()}
    aliases = readers._aliases_from_groups(readers._saved_ties(tag_dir), set(model))
    shapes = {n: tuple(t.shape) for n, t in model.items() if n not in aliases}

    def read(names: list[str]) -> Iterator[Entry]:
        for n in names:
            s = state.get(n, {})
            out = {"param": model[n].float(), **{k: s[k].float() for k in MOMENTS if k in s}}
            yield Entry(n, out, _step_value(s["step"]) if "step" in s else 0.0)

    return Source(tag_dir, "full", shapes, aliases, read)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _deepspeed_source(tag_dir: Path) -> Source:
    ds_dir = tag_dir / layout.DEEPSPEED_DIR
    model_file, optim_files, stage3_models = readers._deepspeed_files(ds_dir)
    states = deepspeed_state.load_file(model_file)
    index = zero_layout.ZeroIndex(states, optim_files, stage3_models, deepspeed_state.load_file)
    by_canonical = {canonical_name(n): n for n in index.shapes}
    shapes = {c: index.shapes[n] for c, n in by_canonical.items()}
    aliases = {canonical_name(a): canonical_name(b) for a, b in (states.get("shared_params") or {}).items()}
    aliases = {a: b for a, b in aliases.items() if b in shapes and a not in shapes}

    def read(names: list[str]) -> Iterator[Entry]:
        for n in names:
            raw = by_canonical[n]
            out = {"param": index.read(raw, None)}
            for key in MOMENTS:
                if index.has_state(raw, key):
                    out[key] = index.read(raw, key)
            yield Entry(n, out, index.step(raw))

    return Source(tag_dir, f"deepspeed-zero{index.stage}", shapes, aliases, read)


def open_source(tag_dir: Path, *, budget: int = 256 << 20) -> Source:
    """Local. The parameters of any tag, by canonical name (nothing is read until `read`)."""
    kind = layout.detect_format(tag_dir)
    if kind == "deepspeed":
        return _deepspeed_source(tag_dir)
    return _dcp_source(tag_dir, budget) if kind == "sharded" else _full_source(tag_dir)


def client_state(tag_dir: Path) -> dict[str, Any]:
    """Local. The loop's state saved in any tag (read with weights_only=True)."""
    if layout.detect_format(tag_dir) != "deepspeed":
        return torch_state.load_trusted_file(tag_dir / torch_state.CLIENT_FILE)
    model_file, _, _ = readers._deepspeed_files(tag_dir / layout.DEEPSPEED_DIR)
    states = deepspeed_state.load_file(model_file)
    state = states.get(deepspeed_state.STATE_KEY)
    if not isinstance(state, dict):
        raise CheckpointError(f"{model_file}: no harness state ({deepspeed_state.STATE_KEY!r}); was the tag written "
                              "by scaletrain?")
    return state.get("client_state", state)


# ---------------------------------------------------------------------------------------------- writing


def _distinct_params(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each trainable parameter once, with every canonical name it has (a tied one has two)."""
    groups: dict[int, tuple[list[str], nn.Parameter]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), ([], p))[0].append(canonical_name(raw))
    return [(names, p) for names, p in groups.values() if p.requires_grad]


def _plan(source: Source, model: nn.Module, shape_of: Callable[[nn.Parameter], tuple[int, ...]]
          ) -> list[tuple[str, nn.Parameter]]:
    """(stored name, parameter) for every trainable parameter; a missing name or shape is one line."""
    out = []
    for names, p in _distinct_params(model):
        stored = source.stored_name(names)
        if stored is None:
            raise CheckpointError(f"checkpoint {source.path} has no parameter {names[0]}; it was written for another "
                                  "model: resume with the model settings it was saved with")
        want = tuple(shape_of(p))
        if source.shapes[stored] != want:
            raise CheckpointError(f"checkpoint {source.path} was written for another model: {names[0]} has shape "
                                  f"{source.shapes[stored]} there and {want} here; resume with the model settings "
                                  "it was saved with")
        out.append((stored, p))
    return out


def _adamw_step(step: float, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The `step` entry torch's Adam/AdamW make: a float32 scalar, on the parameter's device when fused
    or capturable, else on the CPU."""
    group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), {})
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")


@torch.no_grad()
def restore_torch(source: Source, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Local (every rank reads the files). Weights and AdamW state into a torch-native model (plain,
    DDP-wrapped inside, FSDP2 or tensor-parallel DTensors). Returns how many parameters got moments."""
    from scaletrain.model.materialize import local_piece

    with_moments = 0
    plan = _plan(source, model, lambda p: tuple(p.shape))
    for (_, p), entry in zip(plan, source.read([s for s, _ in plan]), strict=True):
        target = p.to_local() if isinstance(p, DTensor) else p
        target.copy_(local_piece(entry.tensors["param"], p).to(target.dtype))
        if not all(k in entry.tensors for k in MOMENTS):
            optimizer.state.pop(p, None)  # no moments saved (the optimizer had not stepped): a fresh start
            continue
        state: dict[str, Any] = {"step": _adamw_step(entry.step, optimizer, p)}
        for key in MOMENTS:
            value = torch.zeros_like(p, memory_format=torch.preserve_format)
            local = value.to_local() if isinstance(value, DTensor) else value
            local.copy_(local_piece(entry.tensors[key], p).to(local.dtype))
            state[key] = value
        optimizer.state[p] = state
        with_moments += 1
    return with_moments


def _zero_groups(opt: Any, stage: int) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(parameters, flat fp32 partition this rank owns) for each group of a ZeRO optimizer."""
    if stage == 3:
        return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, strict=True))
    return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, strict=True))


def _ensure_zero_state(opt: Any, stage: int, step: float) -> None:
    """Create the base optimizer's state for every flat partition as its first step would (zeros), with
    the step of that group's parameters, and link ZeRO-1/2's fragments to it."""
    base = opt.optimizer
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    for _, flat in _zero_groups(opt, stage):
        state = base.state[flat]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state["step"] = _adamw_step(step, base, flat) if torch_adam else int(step)  # DeepSpeedCPUAdam: an int
    if stage < 3:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def restore_deepspeed(source: Source, ds_engine: Any, model: nn.Module) -> int:
    """Local (every rank reads the files). Weights and AdamW state into a DeepSpeed ZeRO-1/2/3 engine,
    through DeepSpeed's `safe_set_full_*` setters (see the module docstring). Returns how many
    parameters got moments."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = ds_engine.optimizer
    stage = int(ds_engine.zero_optimization_stage())
    plan = _plan(source, model, lambda p: tuple(getattr(p, "ds_shape", p.shape)))
    count, ready = 0, False
    for (_, p), entry in zip(plan, source.read([s for s, _ in plan]), strict=True):
        if not ready:
            # DeepSpeed keeps one step per flat group; the parameters of one run share their step count.
            _ensure_zero_state(opt, stage, entry.step)
            ready = True
        value = entry.tensors["param"]
        safe_set_full_fp32_param(p, value)
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, entry.tensors.get(key, torch.zeros_like(value)), key)
        _set_low_precision(p, value, opt, stage)
        count += int(all(k in entry.tensors for k in MOMENTS))
    return count


def _set_low_precision(p: nn.Parameter, value: torch.Tensor, opt: Any, stage: int) -> None:
    """The copy of the weights the forward pass reads: whole under ZeRO-1/2, this rank's partition of
    `ds_tensor` (padded at the end) under ZeRO-3."""
    if stage < 3:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))
        return
    part = p.ds_tensor
    n = part.ds_numel if hasattr(part, "ds_numel") else part.numel()
    rank = opt._get_param_partition_rank(p)
    flat = value.reshape(-1)
    piece = flat[rank * n:(rank + 1) * n]
    target = part.data.view(-1)
    target.zero_()
    target[:piece.numel()].copy_(piece.to(target.dtype))


# ---------------------------------------------------------------------------------------------- the notice


def describe(meta: dict[str, Any], target: str, world: int, n_params: int, n_moments: int) -> str:
    """The one line a converting resume logs."""
    spec = meta.get("backend_spec") or meta.get("backend") or meta.get("format", "?")
    what = "weights, AdamW moments and step per parameter" if n_moments == n_params else (
        f"weights; AdamW moments and step for {n_moments} of {n_params} parameters (the rest start fresh)")
    return (f"resumed from a {spec} tag at world {meta.get('world_size', '?')} into {target} at world {world}: "
            f"{what}")


def notice(meta: dict[str, Any], target: str, world: int, rank: int, n_params: int, n_moments: int) -> None:
    """Local. The one-line warning of a converting resume, on rank 0."""
    if rank == 0:
        log.warning("%s", describe(meta, target, world, n_params, n_moments))


def count_params(model: nn.Module) -> int:
    return len(_distinct_params(model))


def zero_stage(tag_dir: Path, meta: dict[str, Any]) -> int | None:
    """The ZeRO stage that wrote a DeepSpeed tag (meta.json's backend spec, else the files); None for
    other tags."""
    if layout.detect_format(tag_dir) != "deepspeed":
        return None
    spec = str(meta.get("backend_spec") or "")
    if spec.startswith("deepspeed:") and spec[len("deepspeed:"):][:1].isdigit():
        return int(spec[len("deepspeed:")])
    ds_dir = tag_dir / layout.DEEPSPEED_DIR
    return 3 if any(ds_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")) else 2


def is_foreign(tag_dir: Path, own_format: str) -> bool:
    """Whether a tag's files are of the other family (DeepSpeed versus torch-native) than an engine's."""
    fmt = layout.detect_format(tag_dir)
    return (fmt == "deepspeed") != (own_format == "deepspeed")
