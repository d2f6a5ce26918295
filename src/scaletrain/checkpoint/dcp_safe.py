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
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from scaletrain.errors import CheckpointError

# (module, name) pairs the metadata pickle may name, besides torch dtypes and DCP's metadata module.
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__ and not name.startswith("__"):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(dcp_dir: Path) -> dcp_metadata.Metadata:
    """The `.metadata` of a DCP folder, built only from DCP's metadata classes."""
    path = Path(dcp_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {path} cannot be read safely: {e}") from e
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointError(f"checkpoint metadata {path} is not DCP metadata")
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
