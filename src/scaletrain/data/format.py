"""A data folder's format: `meta.json` (vocab_size, dtype, tokenizer, token counts), the tokenizer file
beside it, and nanoGPT folders (the bins, no meta.json, read as uint16 given `data.vocab_size`; meta.pkl
is never opened). Imports: numpy, `scaletrain.errors`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaletrain.errors import DataError

log = logging.getLogger(__name__)


BYTE_TOKENIZER = "bytes"  # token id = byte value; vocab 256


TOKENIZER_FILE = "tokenizer.json"  # a HuggingFace `tokenizers` tokenizer, stored in the data folder


# What `prepare` says when an optional package it needs is missing.
INSTALL_HINT = "pip install tokenizers datasets (or scaletrain[data])"
NANOGPT_DTYPE = "uint16"  # what a folder without meta.json is read as (nanoGPT's own choice)


@dataclass(frozen=True)
class DataMeta:
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    tokenizer: Path | None = None  # the folder's tokenizer.json, when prepare stored one


def _nanogpt_meta(path: Path, vocab_size: int | None) -> dict:
    """The meta of a folder with train.bin/val.bin and no meta.json (nanoGPT's layout). Its meta.pkl,
    if any, is never opened: unpickling runs code, and the vocabulary size is all we need."""
    pkl = " (its meta.pkl is ignored: never unpickled)" if (path / "meta.pkl").exists() else ""
    if vocab_size is None:
        raise DataError(
            f"data.path: {path} has no meta.json (a nanoGPT folder?){pkl}; set data.vocab_size=N "
            f"({NANOGPT_DTYPE} ids assumed)"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= 2**16:
        raise DataError(
            f"data.vocab_size: {vocab_size!r} does not fit the {NANOGPT_DTYPE} ids of {path} (no meta.json); "
            "set data.vocab_size to a value in 1..65536"
        )
    return {"vocab_size": vocab_size, "dtype": NANOGPT_DTYPE}


def read_meta(path: Path, vocab_size: int | None = None) -> DataMeta:
    """Check a data folder and read its meta.json; every problem is a one-line DataError.

    A folder with train.bin and val.bin but no meta.json (nanoGPT's layout) is read as uint16 ids when
    `vocab_size` (config `data.vocab_size`) is given; a `meta.pkl` there is never read. When meta.json
    exists, a given `vocab_size` must equal the one it records."""
    path = Path(path)
    hint = f"run `scaletrain prepare --out {path}` or set data.path"
    if not path.is_dir():
        raise DataError(f"data.path: folder {path} does not exist; {hint}")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        if (path / "train.bin").is_file() and (path / "val.bin").is_file():
            meta = _nanogpt_meta(path, vocab_size)
        else:
            raise DataError(f"data.path: {meta_file} is missing; {hint}")
    else:
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict):
                raise TypeError("not a JSON object")
        except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError, OSError) as e:
            raise DataError(f"data.path: {meta_file} is malformed ({e}); {hint}") from None
    try:
        vocab, dtype = meta["vocab_size"], str(meta["dtype"])
        if isinstance(vocab, bool) or not isinstance(vocab, int):
            raise TypeError(f"vocab_size {vocab!r} is not an integer")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"data.path: {meta_file} is malformed ({e}); {hint}") from None
    if vocab < 1:
        raise DataError(f"data.path: {meta_file} has vocab_size {vocab}; expected a positive integer; {hint}")
    if vocab_size is not None and vocab_size != vocab:
        raise DataError(
            f"data.vocab_size: {vocab_size} differs from vocab_size {vocab} in {meta_file}; "
            "unset data.vocab_size or re-run `scaletrain prepare` with the intended tokenizer"
        )
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"data.path: {meta_file} has dtype {dtype!r}; expected uint16 or uint32")
    max_id = meta.get("max_token_id")
    if max_id is not None and (isinstance(max_id, bool) or not isinstance(max_id, int) or max_id >= vocab):
        raise DataError(
            f"data.path: {meta_file} records max_token_id {max_id!r} but vocab_size {vocab}; "
            f"the tokens do not fit the vocabulary; {hint} with the right tokenizer"
        )
    counts = {split: _split_tokens(path, split, meta, dtype, hint) for split in ("train", "val")}
    tok = path / TOKENIZER_FILE if meta.get("tokenizer") == TOKENIZER_FILE else None
    return DataMeta(vocab, dtype, counts["train"], counts["val"], tok if tok and tok.is_file() else None)


def _split_tokens(path: Path, split: str, meta: dict[str, Any], dtype: str, hint: str) -> int:
    """Tokens in `split`.bin, checked against its size and against what meta.json records."""
    f = path / f"{split}.bin"
    if not f.is_file():
        raise DataError(f"data.path: {f} is missing; {hint}")
    size, itemsize = f.stat().st_size, np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"data.path: {f} is {size} bytes, not a whole number of {dtype} tokens")
    recorded = meta.get(f"{split}_tokens")
    if recorded is not None and recorded != size // itemsize:
        raise DataError(
            f"data.path: {path / 'meta.json'} says {split}_tokens={recorded!r} but {f} holds {size // itemsize} "
            f"tokens (the bins were replaced or truncated); {hint} --force"
        )
    return size // itemsize
