"""Item 1/17: the DCP `.metadata` reader builds only DCP metadata, never runs code, keeps shards inside."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from scaletrain.checkpoint.dcp_safe import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from scaletrain.errors import CheckpointError

MD = "torch.distributed.checkpoint.metadata"


def _u(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def _framed(body: bytes) -> bytes:
    """Protocol 4 with a FRAME, like DCP writes."""
    body += b"."
    return b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body


def _global(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + b"\x93"  # STACK_GLOBAL


def dataclass_trick(marker: Path) -> bytes:
    """BUILD `__annotations__` onto a DCP class, then `dataclass(cls)`: the generated `__init__`
    source embeds the field names, so a field name is an expression."""
    field = f"x=__import__('os').system('touch {marker}')"
    state = b"}" + _u("__annotations__") + b"}" + _u(field) + _u("int") + b"s" + b"s"
    return _framed(_global(MD, "dataclass") + _global(MD, "StorageMeta") + state + b"b" + b"\x85R")


def build_on_class() -> bytes:
    state = b"}" + _u("__annotations__") + b"}" + b"s"
    return _framed(_global(MD, "StorageMeta") + state + b"b")


def reduce_os_system(marker: Path) -> bytes:
    class P:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(P(), protocol=4)


def global_module_attr() -> bytes:
    return _framed(_global(MD, "os"))


def reduce_dcp_class() -> bytes:
    return _framed(_global(MD, "Metadata") + b"}" + b"\x85R")


def _write(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".metadata").write_bytes(payload)
    return folder


@pytest.mark.parametrize(
    "name", ["dataclass_trick", "build_on_class", "reduce_os_system", "global_module_attr", "reduce_dcp_class"]
)
def test_hostile_dcp_metadata_refused_without_side_effect(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "dataclass_trick": lambda: dataclass_trick(marker),
        "build_on_class": build_on_class,
        "reduce_os_system": lambda: reduce_os_system(marker),
        "global_module_attr": global_module_attr,
        "reduce_dcp_class": reduce_dcp_class,
    }[name]()
    folder = _write(tmp_path / "dcp", payload)
    with pytest.raises(CheckpointError) as ei:
        read_metadata(folder)
    assert "\n" not in str(ei.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        SafeFileSystemReader(str(folder)).read_metadata()
    assert not marker.exists()


def test_garbage_dcp_metadata_is_one_line_checkpoint_error(tmp_path: Path) -> None:
    for i, payload in enumerate([b"", b"\x80\x04garbage", _framed(b"}")[:-3], _framed(b"N")]):
        folder = _write(tmp_path / str(i), payload)
        with pytest.raises(CheckpointError) as ei:
            read_metadata(folder)
        assert "\n" not in str(ei.value)


def _real_checkpoint(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    o = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    o.step()
    dcp.save({"model": m.state_dict(), "optim": o.state_dict()}, checkpoint_id=str(folder))
    return m


@pytest.mark.filterwarnings("ignore")
def test_real_dcp_checkpoint_round_trips_through_safe_reader(tmp_path: Path) -> None:
    m = _real_checkpoint(tmp_path / "ok")
    md = read_metadata(tmp_path / "ok")
    assert any(k.startswith("optim.") for k in md.state_dict_metadata)
    sd = {"model": {k: torch.zeros_like(v) for k, v in m.state_dict().items()}}
    dcp.load(sd, storage_reader=SafeFileSystemReader(str(tmp_path / "ok")), planner=SafeLoadPlanner())
    assert all(torch.equal(sd["model"][k], v) for k, v in m.state_dict().items())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("rel", ["../outside.distcp", "/etc/passwd", "sub/../../x.distcp", "a/b.distcp"])
def test_dcp_shard_relative_path_outside_folder_refused(tmp_path: Path, rel: str) -> None:
    folder = tmp_path / "ck"
    _real_checkpoint(folder)
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own trusted file, just written
    for info in md.storage_data.values():
        info.relative_path = rel
    (folder / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        SafeFileSystemReader(str(folder)).read_metadata()
