"""Building models too big for one rank: construct on the `meta` device, shard, then materialise each
rank's piece only.

Initial weights are a function of (seed, parameter name) alone: every backend, world size and
sharding starts from the same numbers. Each parameter's full value is generated on the CPU one tensor
at a time (peak = the largest tensor) under an RNG seeded from the seed and the name, then sliced to
the local shard; no collective is involved (DTensor's own RNG would not help: on the CPU every rank
would draw the same shard).

    model = build_on_meta(factory)        parameters on meta, buffers real (the constructors' own)
    ... apply_tp / fully_shard on meta ...
    materialize(model, device=..., seed=..., source=None | weights file)

Where a value comes from, in order: `source` (a consolidated weights file, or a folder holding
`model.safetensors` or `model.safetensors.index.json` such as a Hugging Face model or a
`consolidate --format hf` export, read tensor by tensor), the model's `init_parameter(name, tensor)`
hook (the built-in GPT has one), a HuggingFace model's `_init_weights(module)`, the owning module's
`reset_parameters()`. A model none of these covers is refused with one line naming the hook to write.
A tied parameter takes its value from whichever of its names the source holds (Hugging Face files
leave `lm_head.weight` out when it is tied to the input embedding).
Imports: torch, safetensors, `scaletrain.model.weights`, `scaletrain.errors`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.model.weights import canonical_name

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to `meta` at once; buffers stay where they are made.

    A parameter is created (`torch.empty`, pages never touched) and moved before its module's
    initialiser runs, so construction costs neither memory nor time."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with every parameter on `meta` and its buffers computed on the CPU."""
    try:
        with _parameters_on_meta():
            model = factory()
    except (NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"model cannot be built on the meta device ({str(e).splitlines()[0]}); make its "
                          "constructor shape-only and give it init_parameter(name, tensor) (docs/models.md)") from e
    return model


def name_seed(seed: int, name: str) -> int:
    """A 63-bit RNG seed from the run seed and a canonical parameter name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def _init_by_module(model: nn.Module, name: str, out: torch.Tensor) -> None:
    """Fill `out` with what the owning module's own initialiser gives, run on a CPU copy of it."""
    owner, leaf = _owner(model, name)
    hf_init = getattr(model, "_init_weights", None)
    if hf_init is None and not hasattr(owner, "reset_parameters"):
        raise ConfigError(
            f"model: {type(model).__name__} cannot be initialised on the meta device ({name} belongs to "
            f"{type(owner).__name__}, which has no reset_parameters); define init_parameter(name, tensor) on the "
            "model (docs/models.md)")
    clone = copy.copy(owner)  # shallow: the copy gets its own parameter dict, no children
    clone._parameters = {k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
                         for k, p in owner._parameters.items()}
    clone._modules = {}
    with torch.no_grad():
        if hf_init is not None:
            hf_init(clone)
        else:
            clone.reset_parameters()
        out.copy_(clone._parameters[leaf])


def init_value(model: nn.Module, name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The full initial value of parameter `name`: a CPU tensor, a function of (seed, name) alone."""
    out = torch.empty(shape, dtype=dtype)
    hook = getattr(model, "init_parameter", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(name_seed(seed, name))
        if hook is not None:
            hook(name, out)
        else:
            _init_by_module(model, name, out)
    return out


def local_piece(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for `param` (a DTensor shard, or the whole tensor)."""
    if not isinstance(param, DTensor):
        return full
    if all(type(p) is Shard or p.is_replicate() for p in param.placements):
        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        return full[index]
    # Strided shards (FSDP over tensor parallel): let DTensor slice it, locally (no scatter).
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


# What a weights folder (a Hugging Face model, a `consolidate --format hf` export) holds, in the
# order Hugging Face looks for them: one file, else the index of the shards.
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json")


def folder_weights(folder: Path) -> Path | None:
    """The weights file a folder holds (`FOLDER_FILES`), or None."""
    return next((folder / n for n in FOLDER_FILES if (folder / n).is_file()), None)


def check_weights_source(path: Path) -> None:
    """`model.init_from` names a weights file or a folder holding one; ConfigError in one line if not.
    (Whether the file can be read is `WeightsSource`'s business, on every rank.)"""
    path = Path(path)
    if path.is_file():
        return
    if path.is_dir():
        if folder_weights(path) is None:
            raise ConfigError(f"model.init_from: the folder {path} holds neither {' nor '.join(FOLDER_FILES)}; give a "
                              "Hugging Face model folder, a `scaletrain consolidate` output, or a weights file")
        return
    raise ConfigError(f"model.init_from: {path} does not exist; give a consolidated weights file or a folder "
                      f"holding {FOLDER_FILES[0]}")


class WeightsSource:
    """Weights read one tensor at a time: a `.safetensors` file (or its `.index.json`) through
    safetensors' lazy reader, a `.pt` state dict memory-mapped with `weights_only=True`, or a folder
    holding `model.safetensors` / `model.safetensors.index.json` (`FOLDER_FILES`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tensors: dict[str, Callable[[], torch.Tensor]] = {}
        try:
            if self.path.is_dir():
                file = folder_weights(self.path)
                if file is None:
                    raise ValueError(f"a folder without {' or '.join(FOLDER_FILES)}")
                for f in self._safetensors_files(file):
                    self._add_safetensors(f)
            elif self.path.suffix == ".pt":
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict):
                    raise ValueError("not a state dict")
                for key, t in state.items():
                    self._tensors[canonical_name(key)] = lambda t=t: t
            else:
                for f in self._safetensors_files(self.path):
                    self._add_safetensors(f)
        except Exception as e:  # a file from elsewhere: pickle refusals, safetensors header errors, ...
            first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"model.init_from: cannot read {self.path} ({first}); give a file or folder "
                                  "written by `scaletrain consolidate`, or a Hugging Face model folder") from None

    @staticmethod
    def _safetensors_files(path: Path) -> list[Path]:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())["weight_map"]
            names = {str(f) for f in index.values()}
            # Shards are plain files beside the index: no other folder, and never an index again.
            if any(Path(n).name != n or n.endswith(".index.json") for n in names):
                raise ValueError("a shard name in the index is not a plain weights file beside it")
            return sorted(path.parent / n for n in names)
        if path.suffix != ".safetensors":
            raise ValueError("not a .safetensors file, its .index.json, or a .pt state dict")
        return [path]

    def _add_safetensors(self, file: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt", device="cpu")
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            self._tensors[canonical_name(key)] = lambda h=handle, k=key: h.get_tensor(k)

    def find(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self._tensors), None)

    def read(self, name: str, shape: torch.Size) -> torch.Tensor:
        tensor = self._tensors[name]()
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"model.init_from: {self.path}: {name} has shape {tuple(tensor.shape)}, the "
                                  f"model expects {tuple(shape)}; it was written for another model size")
        return tensor


def _tied_slots(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) slots that share one parameter, for each tied parameter."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                slots.setdefault(id(param), []).append((module, leaf))
    return [group for group in slots.values() if len(group) > 1]


def _retie(ties: list[list[tuple[nn.Module, str]]]) -> None:
    """`to_empty` from meta gives every slot a new parameter of its own; tie them again to the first.
    (FSDP-managed parameters keep their ties, and then this changes nothing.)"""
    for (first_module, first_leaf), *others in ties:
        shared = first_module._parameters[first_leaf]
        for module, leaf in others:
            module._parameters[leaf] = shared


def tie_groups(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each distinct parameter with all its canonical names (a tied weight has two), in model order."""
    groups: dict[int, tuple[list[str], nn.Parameter]] = {}
    for raw_name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), ([], param))[0].append(canonical_name(raw_name))
    return list(groups.values())


def parameter_value(model: nn.Module, names: list[str], param: torch.Tensor, *, seed: int,
                    source: WeightsSource | None) -> torch.Tensor:
    """The full starting value of one (possibly tied) parameter: from `source`, or initialised."""
    if source is None:
        return init_value(model, names[0], param.shape, param.dtype, seed)
    stored = source.find(names)
    if stored is None:
        raise CheckpointError(f"model.init_from: {source.path} has no tensor {names[0]}; it was written for "
                              "another model")
    return source.read(stored, param.shape).to(param.dtype)


@torch.no_grad()
def materialize(model: nn.Module, *, device: torch.device, seed: int, source: Path | None = None) -> None:
    """Local. Allocate this rank's parameters on `device` and fill them (see the module docstring);
    buffers keep the values their constructors computed (RoPE tables and the like)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    ties = _tied_slots(model)
    model.to_empty(device=device)
    _retie(ties)
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
    reader = WeightsSource(source) if source is not None else None
    for names, param in tie_groups(model):
        full = parameter_value(model, names, param, seed=seed, source=reader)
        target = param.to_local() if isinstance(param, DTensor) else param
        # Pageable CPU -> device copies are synchronous; one tensor at a time keeps the peak at one tensor.
        target.copy_(local_piece(full, param).to(target.device))


def build_initialized(factory: Callable[[], nn.Module], *, device: torch.device, seed: int,
                      source: Path | None = None) -> nn.Module:
    """The unsharded path (DDP, ZeRO-1/2): meta build + materialise, the same values as any sharded one."""
    model = build_on_meta(factory)
    materialize(model, device=device, seed=seed, source=source)
    return model
