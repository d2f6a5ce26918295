from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data.format import read_meta
from scaletrain.data.prepare import prepare
from scaletrain.data.tokens import Batches, BatchPlan
from scaletrain.errors import DataError


def test_prepare_from_text(tmp_path: Path):
    src = tmp_path / "in.txt"
    src.write_text("hello world\n" * 500)
    meta = prepare([src], tmp_path / "d")
    on_disk = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert on_disk == meta and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    tokens = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert bytes(tokens[:11].astype(np.uint8)) == b"hello world"
    assert read_meta(tmp_path / "d").train_tokens == meta["train_tokens"]


def test_missing_and_malformed_data(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"meta\.json is missing"):
        read_meta(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed"):
        read_meta(tmp_path / "d")


def _global_batch(data: Path, micro: int, accum: int, world: int, step: int):
    meta = read_meta(data)
    rows = []
    for rank in range(world):
        b = Batches(data, meta, block_size=16, plan=BatchPlan(micro, accum, world), rank=rank, seed=7)
        rows.extend(x for x, _ in b.train_micro_batches(step))
    import torch

    return torch.cat(rows)


def test_global_batch_is_independent_of_layout(tiny_data: Path):
    """Same (seed, step) -> the same sequences, whatever the world size and accumulation."""
    ref = _global_batch(tiny_data, 8, 1, 1, step=3)
    assert (_global_batch(tiny_data, 4, 1, 2, step=3) == ref).all()
    assert (_global_batch(tiny_data, 2, 4, 1, step=3) == ref).all()
    assert (_global_batch(tiny_data, 1, 2, 4, step=3) == ref).all()
    assert not (_global_batch(tiny_data, 8, 1, 1, step=4) == ref).all()


def test_targets_are_shifted_inputs(tiny_data: Path):
    b = Batches(tiny_data, read_meta(tiny_data), block_size=16, plan=BatchPlan(2, 1, 1), rank=0, seed=0)
    (x, y), = b.train_micro_batches(0)
    assert (x[:, 1:] == y[:, :-1]).all()
    vx, _ = b.val_batch(0)
    assert vx.shape == (2, 16) and (vx == b.val_batch(0)[0]).all()
