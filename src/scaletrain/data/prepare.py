"""`scaletrain prepare`: text files, JSONL, Parquet or CSV in; a token data folder out.

Tokens are byte values by default (vocab 256), or the ids of a HuggingFace `tokenizers` tokenizer
(`--tokenizer PATH`), or of a byte-level BPE trained on the input first (`--train-tokenizer N`); the
tokenizer is stored in the folder as `tokenizer.json`. Documents are streamed in pieces, grouped
into chunks, encoded a chunk at a time (`encode_batch` spreads one chunk over every core, and the
next chunk is read while the last one encodes) and appended to `train.bin` in input order, so memory
holds a few chunks whatever the size of the input. At the end the last VAL_FRACTION of the token
stream moves to `val.bin`, the same split as an in-memory prepare would make.

Documents (`data.documents`) are joined with the tokenizer's end-of-text token when it has one, else
with a newline (always a newline for bytes).

Imports: numpy, rich; `scaletrain.data` (`documents`, `format`, `tokenizer`), `scaletrain.errors`,
`scaletrain.io`.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaletrain.data.documents import (
    DEFAULT_CORPUS_BYTES,
    TABLE_SUFFIXES,
    Stats,
    chunks,
    default_corpus_files,
    input_files,
    pieces,
)
from scaletrain.data.format import BYTE_TOKENIZER, TOKENIZER_FILE
from scaletrain.data.tokenizer import (
    TRAINED_EOS,
    encode_bytes,
    encode_chunk,
    eos_id,
    load_tokenizer,
    require_tokenizers,
    train_tokenizer,
    vocab_size_of,
)
from scaletrain.errors import DataError
from scaletrain.io import replace_dir

VAL_FRACTION = 0.05
IN_FLIGHT = 3  # chunks being encoded or waiting to be written: the memory bound is about this many chunks
MIN_TRAINED_VOCAB = 257  # 256 byte symbols + the end-of-text token
UINT16_VOCAB = 2**16


@dataclass
class _Encoder:
    """What turns chunks into ids: a tokenizer (None: bytes), its end-of-text id, the ids' dtype, and the
    separator put between documents."""

    tok: Any
    eos: int | None
    dtype: np.dtype
    sep: np.ndarray

    @classmethod
    def make(cls, tok: Any, eos: int | None) -> _Encoder:
        vocab = 256 if tok is None else vocab_size_of(tok)
        dtype = np.dtype(np.uint16 if vocab <= UINT16_VOCAB else np.uint32)
        if tok is None:
            sep = np.array([ord("\n")], dtype)
        elif eos is not None:
            sep = np.array([eos], dtype)
        else:
            sep = np.asarray(tok.encode("\n", add_special_tokens=False).ids, dtype=dtype)
        return cls(tok, eos, dtype, sep)

    @property
    def vocab(self) -> int:
        return 256 if self.tok is None else vocab_size_of(self.tok)


def _progress(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )


def _split_tail(train: Path, val: Path, n_val: int, itemsize: int) -> None:
    """Move the last `n_val` tokens of `train` into `val`, a block at a time."""
    with open(train, "r+b") as src, open(val, "wb") as dst:
        start = src.seek(0, os.SEEK_END) - n_val * itemsize
        src.seek(start)
        shutil.copyfileobj(src, dst, 16 * 2**20)
        src.truncate(start)


def prepare(
    inputs: list[Path],
    out_dir: Path,
    *,
    max_bytes: int | None = None,
    force: bool = False,
    tokenizer: Path | None = None,
    train_vocab: int | None = None,
    text_field: str | None = None,
    progress: bool = False,
) -> dict:
    """Tokenise `inputs` (the built-in corpus when empty) into `out_dir/{train,val}.bin` and `meta.json`.

    Files are read in sorted order (folders recursively); the last VAL_FRACTION of the token stream is
    the validation split. A non-empty `out_dir` is refused unless `force`; the folder is written
    beside it and renamed into place, so an interrupted prepare leaves the old folder or the new one,
    never a mix. Returns the meta.json record.
    """
    _check_args(tokenizer, train_vocab, max_bytes)
    files = input_files(list(inputs)) if inputs else default_corpus_files()
    cap = max_bytes if max_bytes is not None else (None if inputs else DEFAULT_CORPUS_BYTES)
    tok = eos = tok_file = None
    if tokenizer is not None:  # before touching the output: a bad tokenizer costs nothing
        tok, tok_file, eos = load_tokenizer(Path(tokenizer))
    elif train_vocab is not None:
        require_tokenizers()
    with replace_dir(Path(out_dir), force=force, what="prepare --out", error=DataError) as tmp:
        if train_vocab is not None:
            tok, eos = _train(files, text_field, cap, train_vocab, tmp, progress)
        elif tok_file is not None:
            shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)
        enc = _Encoder.make(tok, eos)
        stats = Stats()
        n_tokens, max_id = _write_train(files, text_field, cap, enc, tmp / "train.bin", stats, progress)
        n_val = max(int(n_tokens * VAL_FRACTION), 1)
        if n_tokens - n_val < 2:
            raise DataError(f"prepare: only {n_tokens} tokens of text; give more input")
        _split_tail(tmp / "train.bin", tmp / "val.bin", n_val, enc.dtype.itemsize)
        meta = _meta(enc, n_tokens, n_val, max_id, stats)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _check_args(tokenizer: Path | None, train_vocab: int | None, max_bytes: int | None) -> None:
    if tokenizer is not None and train_vocab is not None:
        raise DataError("prepare: pass --tokenizer or --train-tokenizer, not both")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"prepare --max-bytes: {max_bytes} is not a positive number of bytes")
    if train_vocab is not None and train_vocab < MIN_TRAINED_VOCAB:
        raise DataError(
            f"prepare --train-tokenizer: vocab size {train_vocab} is below {MIN_TRAINED_VOCAB} "
            "(256 byte symbols + end-of-text); pass a larger size"
        )


def _train(files: list[Path], text_field: str | None, cap: int | None, vocab: int, tmp: Path,
           progress: bool) -> tuple[Any, int | None]:
    """A byte-level BPE trained on the input, saved into the folder being written: (tokenizer, eos id)."""
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"prepare: training a byte-level BPE, vocab {vocab:,}")
    texts = (d.decode("utf-8", errors="replace") for _, d in pieces(files, text_field, cap, Stats()))
    tok = train_tokenizer(texts, vocab)
    tok.save(str(tmp / TOKENIZER_FILE))
    return tok, eos_id(tok, [TRAINED_EOS])


def _write_train(files: list[Path], text_field: str | None, cap: int | None, enc: _Encoder, train_file: Path,
                 stats: Stats, progress: bool) -> tuple[int, int]:
    """Encode every chunk in input order into `train_file` (at most IN_FLIGHT chunks encoding at once,
    on a pool while the next is read): (tokens written, largest id)."""
    total = None
    if all(f.suffix.lower() not in TABLE_SUFFIXES for f in files):
        total = sum(f.stat().st_size for f in files)
        total = min(total, cap) if cap is not None else total
    counts = [0, -1]  # tokens written, largest id
    with open(train_file, "wb") as out, _progress(progress, total) as bar, ThreadPoolExecutor(2) as pool:
        task = bar.add_task("prepare", total=total, tokens=0) if bar is not None else None

        def write(ids: np.ndarray, nbytes: int) -> None:
            ids.tofile(out)
            counts[0] += len(ids)
            if len(ids):
                counts[1] = max(counts[1], int(ids.max()))
            if bar is not None:
                bar.update(task, advance=nbytes, tokens=counts[0])

        pending: collections.deque[tuple[Future, int]] = collections.deque()
        for k, chunk in enumerate(chunks(pieces(files, text_field, cap, stats))):
            nbytes = sum(len(d) for _, d in chunk)
            if enc.tok is None:
                write(encode_bytes(chunk, k == 0), nbytes)
                continue
            pending.append((pool.submit(encode_chunk, enc.tok, chunk, enc.sep, k == 0, enc.dtype), nbytes))
            while len(pending) >= IN_FLIGHT:
                fut, nb = pending.popleft()
                write(fut.result(), nb)
        while pending:
            fut, nb = pending.popleft()
            write(fut.result(), nb)
    return counts[0], counts[1]


def _meta(enc: _Encoder, n_tokens: int, n_val: int, max_id: int, stats: Stats) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "vocab_size": enc.vocab,
        "dtype": enc.dtype.name,
        "tokenizer": BYTE_TOKENIZER if enc.tok is None else TOKENIZER_FILE,
        "train_tokens": n_tokens - n_val,
        "val_tokens": n_val,
        "max_token_id": max_id,
        "source_files": stats.files,
    }
    if enc.tok is not None:
        meta["eos_id"] = enc.eos
        meta["documents"] = stats.documents
    return meta
