"""Checkpoint files for the torch-native engines (DDP and FSDP2), in two formats.

sharded: PyTorch Distributed Checkpoint under `dcp/`; each rank writes the shards it owns (a
         replicated DDP state is written once), and loading reshards to any world size.
full:    `model.pt` and `optim.pt` written by rank 0 from a state dict gathered on the CPU.
Both:    `engine.pt` (step count, loss scaler) and `client_state.pt` (the loop's state), rank 0.

Every file is read with `weights_only=True`: tensors, numbers, strings and containers only (DCP
through `dcp_safe`). An async save runs DCP's collectives on a process group of its own, so the
background writer never interleaves with the training step's collectives on the default group.
Imports: torch, `scaletrain.checkpoint.dcp_safe`, `scaletrain.checkpoint.layout`, `scaletrain.errors`.
Knows nothing of the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from scaletrain.checkpoint import layout
from scaletrain.checkpoint.dcp_safe import SafeFileSystemReader, SafeLoadPlanner
from scaletrain.errors import CheckpointError

log = logging.getLogger(__name__)

DCP_DIR = layout.DCP_DIR
MODEL_FILE = layout.MODEL_FILE
OPTIM_FILE = "optim.pt"
ENGINE_FILE = "engine.pt"
CLIENT_FILE = "client_state.pt"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


_ASYNC_GROUP: Any = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _async_group() -> Any:
    """Collective on first use. A gloo group only for background checkpoint writes (torch's advice:
    collectives from two threads on one group may pair up differently on each rank)."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist.is_initialized():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def load_trusted_file(path: Path) -> Any:
    """torch.load that never unpickles code: tensors, numbers, strings and containers only."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the tag is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e})") from e


def save(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fmt: str,
    engine_state: dict[str, Any],
    client_state: dict[str, Any],
    async_save: bool = False,
) -> Callable[[], None] | None:
    """Collective. Write model + optimizer in `fmt`, then rank 0 writes the small state files.

    With `async_save` (sharded only) returns a callable that blocks until the shards are written.
    """
    waiter = None
    if fmt == "sharded":
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if async_save:
            # The stager copies every tensor to fresh CPU memory before returning, so training may
            # change the parameters while the copy is written.
            future = dcp.async_save(state, checkpoint_id=str(path / DCP_DIR), process_group=_async_group())
            waiter = future.result
        else:
            dcp.save(state, checkpoint_id=str(path / DCP_DIR))
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_FULL)
        if _rank() == 0:
            torch.save(model_sd, path / MODEL_FILE)
            torch.save(optim_sd, path / OPTIM_FILE)
    if _rank() == 0:
        # Tied parameters (lm_head.weight = wte.weight), so `consolidate` can store them once.
        torch.save({**engine_state, "tied_params": tie_groups(model)}, path / ENGINE_FILE)
        torch.save(client_state, path / CLIENT_FILE)
    return waiter


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter, in model order (first name first); unshared ones left out."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective. Restore model + optimizer from either format; returns (engine_state, client_state)."""
    fmt = layout.detect_format(path)
    if fmt not in ("sharded", "full"):
        raise CheckpointError(f"checkpoint {path} holds {fmt} files; a PyTorch-native backend reads DCP or full "
                              "checkpoints (convert it, or resume it with the backend that wrote it)")
    try:
        if fmt == "sharded":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            _check_shapes(path, model_sd)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path / DCP_DIR)), planner=SafeLoadPlanner())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            # Every rank maps the full files (mmap: pages are shared, not copied) and keeps its part.
            # broadcast_from_rank0 would save reads on a shared filesystem, but it hangs over gloo in
            # torch 2.13 for unsharded modules.
            opts = StateDictOptions(full_state_dict=True)
            model_sd = load_trusted_file(path / MODEL_FILE)
            optim_sd = load_trusted_file(path / OPTIM_FILE)
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    except CheckpointError:
        raise
    except CheckpointException as e:  # a BaseException: gathered failures of every rank
        first = next(iter(e.failures.values()), e) if getattr(e, "failures", None) else e
        text = str(first[0] if isinstance(first, tuple) else first).strip().splitlines() or [type(e).__name__]
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {text[0]}") from None
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {str(e).splitlines()[0]}") from e
    return load_trusted_file(path / ENGINE_FILE), load_trusted_file(path / CLIENT_FILE)


def _check_shapes(path: Path, model_sd: dict[str, Any]) -> None:
    """Name the first model tensor whose saved shape differs from the model's (DCP itself would fail
    later with a BaseException whose message names neither)."""
    from scaletrain.checkpoint.dcp_safe import read_metadata

    saved = read_metadata(path / DCP_DIR).state_dict_metadata
    for name, value in model_sd.items():
        meta = saved.get(f"model.{name}")
        want = tuple(value.shape)  # a DTensor's shape is its global shape
        got = tuple(getattr(meta, "size", ()) or ())
        if meta is not None and got and got != want:
            raise CheckpointError(f"checkpoint {path} was written for another model: {name} has shape {got} there "
                                  f"and {want} here; resume with the model settings it was saved with")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective. Full fp32 weights gathered to rank 0 on the CPU; {} elsewhere."""
    sd = get_model_state_dict(model, options=_FULL)
    return sd if _rank() == 0 else {}


def release_async_group() -> None:
    """Local. Forget the background-write group (after the last async save finished), so teardown can
    free it; the next async save creates a new one."""
    global _ASYNC_GROUP
    _ASYNC_GROUP = None
