"""DeepSpeed's checkpoint files inside a harness tag, beside `torch_state` for the torch-native engines.

    <tag>/deepspeed/                     DeepSpeed's own files (model states, one optimizer file per rank),
                                         the loop's client state inside the model-states file
    <tag>/deepspeed_universal/           a conversion to DeepSpeed's universal format (another world size),
    <tag>/deepspeed_universal.manifest   made only for tags this run folder wrote, checksummed here

Safety. DeepSpeed reads its own files with `torch.load(weights_only=False)`, which runs any code a
file from elsewhere pickles. Normal loads go through a checkpoint engine that reads with
`weights_only=True` and allows exactly the few DeepSpeed classes below. Changing the world size
needs DeepSpeed's converter and universal loader, which unpickle freely: they run only on tags whose
meta.json carries this run folder's id (`own_run`), into a fresh folder that is checksummed before
it is loaded; any other tag is refused with the safe route.

Waiting. Rank 0 converts while the other ranks wait on a status file with their own deadline
(`CONVERT_TIMEOUT_S`), not inside a collective, so a large conversion never trips `backend.timeout_s`.
Imports: torch, `scaletrain.checkpoint.layout`, `scaletrain.errors`; deepspeed only inside functions.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from scaletrain.checkpoint import layout
from scaletrain.errors import CheckpointError

log = logging.getLogger(__name__)

DS_DIR = layout.DEEPSPEED_DIR  # the tag name DeepSpeed is given: files land in <tag>/deepspeed/
UNIVERSAL_DIR = "deepspeed_universal"
MANIFEST = "deepspeed_universal.manifest"
STATUS = "deepspeed_universal.status"
STATE_KEY = "scaletrain"  # our entry in DeepSpeed's client_state
CONVERT_TIMEOUT_S = 4 * 3600.0  # how long the other ranks wait for rank 0's conversion
CONVERT_POLL_S = 1.0

# The DeepSpeed classes its optimizer-state files pickle besides tensors and containers.
PICKLED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _StandIn:
    """Takes the place of a DeepSpeed object when reading files without DeepSpeed's classes (consolidate):
    keeps what it was built from, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_file(path: Path) -> dict[str, Any]:
    """One DeepSpeed .pt file, memory-mapped, read with weights_only=True and stand-ins for its classes."""
    try:
        with torch.serialization.safe_globals([(_StandIn, name) for name in PICKLED_CLASSES]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"DeepSpeed file {path} cannot be read safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[-1] if str(e) else e})") from e


def use_safe_loading(ds_engine: Any) -> None:
    """Swap DeepSpeed's torch checkpoint engine for one that reads with `weights_only=True` and the
    real classes of `PICKLED_CLASSES` allowed. A non-default engine (nebula, decoupled) is left as is."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        return
    allowed = [_import(name) for name in PICKLED_CLASSES]

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"checkpoint file {path} cannot be read safely "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from e

    ds_engine.checkpoint_engine = SafeTorchCheckpointEngine(ds_engine._config)


# ---------------------------------------------------------------------------------------------- save


def save(ds_engine: Any, path: Path, client_state: dict[str, Any]) -> None:
    """Collective. DeepSpeed's files into `path/deepspeed/`, its own `latest` not written (the harness's
    meta.json and ckpt/latest rule).

    DeepSpeed's save ends in a barrier. A rank whose write fails raises before it, and the others
    would wait there until the timeout: the failing rank joins that barrier first, then raises, so
    the manager can agree on the error with every rank."""
    try:
        ds_engine.save_checkpoint(save_dir=str(path), tag=DS_DIR, client_state={STATE_KEY: client_state},
                                  save_latest=False)
    except BaseException:
        if tdist.is_initialized():
            tdist.barrier()  # collective: the barrier DeepSpeed's save ends with on the other ranks
        raise


# ---------------------------------------------------------------------------------------------- load


def load(ds_engine: Any, path: Path, meta: dict[str, Any], *, world_size: int, rank: int) -> dict[str, Any]:
    """Collective. Restore `path` into `ds_engine`; returns the loop's client state."""
    if (fmt := layout.detect_format(path)) != "deepspeed":
        raise CheckpointError(f"checkpoint {path} holds {fmt} files of a PyTorch-native backend; resume it with "
                              "backend=ddp or fsdp, or convert it")
    saved_world = int(meta.get("world_size", world_size))
    if saved_world == world_size:
        load_path, client = ds_engine.load_checkpoint(str(path), tag=DS_DIR, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        return _client_state(path, load_path, client)
    if not meta.get("own_run"):
        raise CheckpointError(
            f"checkpoint {path} was written on {saved_world} processes by another run; changing the world size "
            "runs DeepSpeed's converter, which unpickles the files, so it is done only for this run folder's "
            f"own tags: resume it on {saved_world} processes, or convert it with `scaletrain convert {path} "
            f"--to deepspeed:STAGE --world {world_size}`")
    _convert_on_rank0(path, rank)
    log.info("checkpoint %s: world size %d -> %d through DeepSpeed's universal format", path, saved_world, world_size)
    with _loading_universal(ds_engine):
        load_path, client = ds_engine.load_checkpoint(str(path / UNIVERSAL_DIR), tag=DS_DIR, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    return _client_state(path, load_path, client)


def _client_state(path: Path, load_path: Any, client: dict[str, Any] | None) -> dict[str, Any]:
    if load_path is None or not client or STATE_KEY not in client:
        raise CheckpointError(f"checkpoint {path}: no harness state in {path / DS_DIR}; was it written by "
                              "backend=deepspeed?")
    state = client[STATE_KEY]
    return state.get("client_state", state)  # older tags nested it one level deeper


def _convert_on_rank0(path: Path, rank: int) -> None:
    """Collective only at the start (one broadcast of an attempt token): rank 0 converts and writes the
    status file; the others poll it with their own deadline."""
    token = uuid.uuid4().hex if rank == 0 else None
    if tdist.is_initialized():
        box = [token]
        tdist.broadcast_object_list(box, src=0)  # collective
        token = box[0]
    if rank == 0:
        err = _ensure_universal(path)
        layout.write_atomic(path / STATUS, json.dumps({"token": token, "error": err}) + "\n")
    else:
        err = _wait_for_status(path, str(token))
    if err:
        raise CheckpointError(f"checkpoint {path}: converting it for this world size failed ({err}); resume it on "
                              "its original world size")


def _wait_for_status(path: Path, token: str) -> str | None:
    deadline = time.monotonic() + CONVERT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            status = json.loads((path / STATUS).read_text())
        except (OSError, ValueError):
            status = None
        if status and status.get("token") == token:
            return status.get("error")
        time.sleep(CONVERT_POLL_S)
    return f"rank 0 did not finish converting within {CONVERT_TIMEOUT_S:.0f} s"


def _ensure_universal(path: Path) -> str | None:
    """Local (rank 0). A verified universal folder beside the tag: reuse one whose manifest matches,
    else convert afresh. Returns an error line or None."""
    universal, manifest = path / UNIVERSAL_DIR, path / MANIFEST
    if universal.is_dir() and manifest.is_file() and _manifest_matches(universal, manifest):
        return None
    shutil.rmtree(universal, ignore_errors=True)  # unverified leftovers are never trusted
    manifest.unlink(missing_ok=True)
    err = convert_to_universal(path / DS_DIR, universal / DS_DIR)
    if err is None:
        names = layout.list_files(universal)
        layout.write_atomic(manifest, json.dumps(layout.digest_files(universal, names), sort_keys=True) + "\n")
    return err


def _manifest_matches(universal: Path, manifest: Path) -> bool:
    try:
        want = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    names = layout.list_files(universal)
    return isinstance(want, dict) and sorted(want) == names and layout.digest_files(universal, names) == want


def convert_to_universal(src: Path, dst: Path) -> str | None:
    """Local. DeepSpeed's converter in a child process, into a temporary folder renamed at the end;
    returns an error line or None. Its reads unpickle freely: callers pass only their own tags."""
    tmp = dst.parent.with_name(f".tmp-{dst.parent.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--input_folder", str(src), "--output_folder", str(tmp / dst.name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"ds_to_universal exited {proc.returncode}: {tail}"
    shutil.rmtree(dst.parent, ignore_errors=True)
    tmp.rename(dst.parent)
    return None


@contextlib.contextmanager
def _loading_universal(ds_engine: Any) -> Iterator[None]:
    """DeepSpeed reads `checkpoint.load_universal` from its config object at load time: switch it on
    for this one load instead of making every run declare it."""
    cfg = ds_engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before
