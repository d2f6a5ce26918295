"""Reading PyTorch Distributed Checkpoints without unpickling arbitrary objects.

Stock DCP reads `.metadata` with `pickle.load` and the non-tensor entries (optimizer hyper-parameters)
with `torch.load(weights_only=False)`. A checkpoint can come from elsewhere, so we read the metadata
with an unpickler that only builds DCP's own metadata classes, and the byte entries with
`weights_only=True`. Tensor entries are already read with `weights_only=True` by DCP.

Imports: torch, `scaletrain.errors`.
"""

from __future__ import annotations

import io
import pickle
import types
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from scaletrain.errors import CheckpointError

# Exactly the globals a real DCP `.metadata` names in torch 2.13 (model + AdamW, plain and FSDP2-sharded,
# listed with pickletools). Anything else -- notably the module attributes `dataclass`, `os`, `torch` that
# DCP's metadata module imports -- is refused: handing those out let a crafted pickle run code.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
}
# Callables REDUCE may call: each builds a plain value from plain arguments.
_REDUCE_OK = ("torch.serialization._get_layout", "pathlib.PosixPath", "pathlib.PurePosixPath",
              "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", "torch.Size")


def _allowed_global(module: str, name: str) -> Any:
    if name in _DCP_CLASSES.get(module, ()):
        mod = {"torch.distributed.checkpoint.metadata": dcp_metadata}.get(module)
        if mod is None:
            from torch.distributed.checkpoint import filesystem as mod
        obj = mod.__dict__.get(name)
        if isinstance(obj, type):
            return obj
    if module == "torch":
        obj = torch.__dict__.get(name)
        if name == "Size":
            return torch.Size
        if isinstance(obj, torch.dtype):
            return obj
    if module == "torch.serialization" and name == "_get_layout":
        from torch.serialization import _get_layout

        return _get_layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath"):
        import pathlib

        return getattr(pathlib, name)
    raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Allow-list unpickler on the pure-Python unpickler (DCP writes protocol 4 with FRAMEs, which
    torch's weights-only unpickler cannot read). Globals come only from `_allowed_global`; REDUCE may
    call only `_REDUCE_OK`; BUILD and NEWOBJ refuse classes and modules as their target, so no
    class attribute (`__annotations__`, `__init__`...) can be rewritten."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        return _allowed_global(module, name)

    def _load_reduce(self) -> None:
        func = self.stack[-2]
        if _qualname(func) not in _REDUCE_OK:
            raise pickle.UnpicklingError(f"REDUCE of {_qualname(func)} is not allowed in checkpoint metadata")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, (type, types.ModuleType)) or not _is_dcp_instance(target):
            raise pickle.UnpicklingError(f"BUILD on {_qualname(target)} is not allowed in checkpoint metadata")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _load_newobj(self) -> None:
        cls = self.stack[-2]
        if not (isinstance(cls, type) and _is_dcp_class(cls)):
            raise pickle.UnpicklingError(f"NEWOBJ of {_qualname(cls)} is not allowed in checkpoint metadata")
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    def _load_newobj_ex(self) -> None:
        cls = self.stack[-3]
        if not (isinstance(cls, type) and _is_dcp_class(cls)):
            raise pickle.UnpicklingError(f"NEWOBJ of {_qualname(cls)} is not allowed in checkpoint metadata")
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    def _refuse(self) -> None:
        raise pickle.UnpicklingError("persistent ids and extension registries are not allowed in checkpoint metadata")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    for _op in (pickle.PERSID, pickle.BINPERSID, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.INST, pickle.OBJ):
        dispatch[_op[0]] = _refuse
    del _op


def _is_dcp_class(cls: type) -> bool:
    return cls.__name__ in _DCP_CLASSES.get(cls.__module__, ())


def _is_dcp_instance(obj: Any) -> bool:
    return not isinstance(obj, type) and _is_dcp_class(type(obj))


def _check_relative_paths(md: dcp_metadata.Metadata, path: Path) -> None:
    """Each shard's `relative_path` must stay inside the DCP folder (no absolute path, no `..`)."""
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        p = PurePosixPath(str(rel))
        if not isinstance(rel, str) or p.is_absolute() or "\\" in rel or ".." in p.parts or len(p.parts) != 1:
            raise CheckpointError(
                f"checkpoint metadata {path}: shard path {rel!r} leaves the checkpoint folder; "
                "the checkpoint is corrupt or hostile, do not load it"
            )


def read_metadata(dcp_dir: Path) -> dcp_metadata.Metadata:
    """The `.metadata` of a DCP folder, built only from DCP's metadata classes."""
    path = Path(dcp_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:  # any failure of an untrusted file is one line, never a traceback
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"checkpoint metadata {path} cannot be read safely: {msg}") from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointError(f"checkpoint metadata {path} is not DCP metadata")
    _check_relative_paths(md, path)
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata comes from the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
        md = read_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor entries with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
