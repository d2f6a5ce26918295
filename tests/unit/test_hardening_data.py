"""Item 14: token ids vs vocab_size, meta counts vs file sizes, prepare's non-empty-folder rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data.format import read_meta
from scaletrain.data.prepare import prepare
from scaletrain.data.tokens import Batches, BatchPlan
from scaletrain.errors import DataError, ScaletrainError
from scaletrain.io import replace_dir


def _text(tmp_path: Path) -> Path:
    f = tmp_path / "in.txt"
    f.write_text("hello world, some text to tokenise. " * 200)
    return f


def _folder(tmp_path: Path, train: np.ndarray, val: np.ndarray, **meta: object) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    train.astype(np.uint16).tofile(d / "train.bin")
    val.astype(np.uint16).tofile(d / "val.bin")
    m = {"vocab_size": 256, "dtype": "uint16", "train_tokens": len(train), "val_tokens": len(val)}
    m.update(meta)
    (d / "meta.json").write_text(json.dumps(m))
    return d


def test_prepare_records_max_token_id_and_read_meta_checks_it(tmp_path: Path) -> None:
    out = tmp_path / "p"
    meta = prepare([_text(tmp_path)], out)
    assert meta["max_token_id"] == max(b"hello world, some text to tokenise. ")
    assert json.loads((out / "meta.json").read_text())["max_token_id"] == meta["max_token_id"]
    m = json.loads((out / "meta.json").read_text())
    m["vocab_size"] = 100  # below 'w' (119)
    (out / "meta.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="max_token_id"):
        read_meta(out)


def test_batch_with_token_above_vocab_raises_data_error(tmp_path: Path) -> None:
    train = np.arange(1000) % 200
    train[500:] = 300  # past vocab 256; no max_token_id recorded, so only the batch check sees it
    d = _folder(tmp_path, train, np.arange(100) % 200)
    meta = read_meta(d)  # no whole-file scan at start
    b = Batches(d, meta, block_size=16, plan=BatchPlan(4, 1, 1), rank=0, seed=0)
    with pytest.raises(DataError, match=r"train\.bin.*token id 300.*vocab_size is 256"):
        for step in range(50):
            b.train_micro_batches(step)


def test_meta_token_counts_must_match_file_sizes(tmp_path: Path) -> None:
    d = _folder(tmp_path, np.arange(1000) % 200, np.arange(100) % 200, train_tokens=5000)
    with pytest.raises(DataError, match=r"train_tokens=5000.*1000"):
        read_meta(d)


def test_prepare_refuses_non_empty_folder_without_force(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match=r"not empty.*--force"):
        prepare([_text(tmp_path)], out)
    assert (out / "keep.txt").exists()
    prepare([_text(tmp_path)], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp siblings
    read_meta(out)


def test_replace_dir_is_atomic_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(out, force=True) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (out / "old").read_text() == "old"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ScaletrainError, match="is a file"), replace_dir(f, force=True):
        pass
