"""`scaletrain prepare`: text files, JSONL, Parquet or CSV in; a token data folder out.

Tokens are byte values by default (vocab 256), or the ids of a HuggingFace `tokenizers` tokenizer
(`--tokenizer PATH`), or of a byte-level BPE trained on the input first (`--train-tokenizer N`); the
tokenizer is stored in the folder as `tokenizer.json`. Documents are streamed in pieces, grouped
into chunks, encoded a chunk at a time (`encode_batch` spreads one chunk over every core, and the
next chunk is read while the last one encodes) and appended to `train.bin` in input order, so memory
holds a few chunks whatever the size of the input. At the end the last VAL_FRACTION of the token
stream moves to `val.bin`, the same split as an in-memory prepare would make.

Documents: a text file is one document; each row of a `.jsonl` / `.parquet` / `.csv` file is one
(its `--text-field` column, read with HF `datasets` in streaming mode). Documents are joined with the
tokenizer's end-of-text token when it has one, else with a newline (always a newline for bytes).
A text file larger than PIECE_BYTES is encoded in pieces, cut after a newline with a non-space
character on each side: a GPT-2 style pre-tokeniser splits there anyway, so the ids are the same as
encoding the file in one go.

Imports: numpy, rich; tokenizers and datasets only when asked for; `scaletrain.data.format`,
`scaletrain.errors`, `scaletrain.io`.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sysconfig
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from scaletrain.data.format import BYTE_TOKENIZER, TOKENIZER_FILE
from scaletrain.errors import DataError
from scaletrain.io import replace_dir

DEFAULT_CORPUS_BYTES = 8 * 2**20
VAL_FRACTION = 0.05
TABLE_SUFFIXES = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PIECE_BYTES = 256 * 2**10  # text files are cut into pieces of about this size (more pieces, more cores busy)
CHUNK_BYTES = 1 * 2**20  # pieces are encoded this many bytes of text at a time
IN_FLIGHT = 3  # chunks being encoded or waiting to be written: the memory bound is about this many chunks
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
TRAINED_EOS = "<|endoftext|>"
MIN_TRAINED_VOCAB = 257  # 256 byte symbols + the end-of-text token
UINT16_VOCAB = 2**16
INSTALL_HINT = "pip install tokenizers datasets (or scaletrain[data])"


def default_corpus_files() -> list[Path]:
    """The Python standard library's own sources: present on every machine, no download needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def _input_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"prepare: input {p} does not exist")
    if not files:
        raise DataError(f"prepare: no files found in {[str(p) for p in inputs]}")
    return files


# ---------------------------------------------------------------------------------------- reading


def _cut(buf: bytes) -> int:
    """Where to end a piece of `buf`: after a newline with a non-space byte on each side, else after
    any newline, else at a UTF-8 character boundary. Always > 0."""
    end = len(buf) - 1
    any_newline = -1
    while end > 0:
        i = buf.rfind(b"\n", 0, end)
        if i < 0:
            break
        if any_newline < 0:
            any_newline = i + 1
        if i > 0 and not buf[i - 1 : i].isspace() and not buf[i + 1 : i + 2].isspace():
            return i + 1
        end = i
    if any_newline > 0:
        return any_newline
    cut = len(buf)
    while cut > 1 and (buf[cut - 1] & 0xC0) == 0x80:  # back off UTF-8 continuation bytes
        cut -= 1
    if buf[cut - 1] >= 0xC0:  # ... and the lead byte they belong to
        cut -= 1
    return cut if cut > 0 else len(buf)


def _text_pieces(f: Path) -> Iterator[tuple[bool, bytes]]:
    """(starts_document, bytes) pieces of one text file; an empty file is one empty piece."""
    try:
        with open(f, "rb") as fh:
            first, rest = True, b""
            while True:
                block = fh.read(PIECE_BYTES)
                buf = rest + block
                if not block:
                    if buf or first:
                        yield first, buf
                    return
                if len(buf) < PIECE_BYTES:
                    rest = buf
                    continue
                cut = _cut(buf)
                yield first, buf[:cut]
                first, rest = False, buf[cut:]
    except OSError as e:
        raise DataError(f"prepare: cannot read {f} ({e.strerror or e}); check the path and its permissions") from None


def _table_pieces(f: Path, text_field: str | None) -> Iterator[tuple[bool, bytes]]:
    """One (True, utf-8 text) per row of a JSONL / Parquet / CSV file, read with HF `datasets`."""
    kind = TABLE_SUFFIXES[f.suffix.lower()]
    if not text_field:
        raise DataError(f"prepare: {f} is a {f.suffix} file; pass --text-field NAME to say which column holds the text")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"prepare: reading {f} needs the `datasets` package; {INSTALL_HINT}") from None
    row_no = 0
    try:
        ds = load_dataset(kind, data_files=str(f), split="train", streaming=True)
        for row_no, row in enumerate(ds, 1):
            if text_field not in row:
                fields = ", ".join(map(str, row)) or "none"
                raise DataError(
                    f"prepare --text-field: {f} has no field {text_field!r} (its fields: {fields}); "
                    "pass --text-field with one of them"
                )
            text = row[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"prepare --text-field: {f} row {row_no} field {text_field!r} holds "
                    f"{type(text).__name__}, not text; pass --text-field naming a text column"
                )
            yield True, text.encode("utf-8", errors="replace")
    except DataError:
        raise
    except Exception as e:  # datasets / pyarrow raise many types for a file they cannot parse
        msg = " ".join(str(e).split())[:200]
        where = f" near row {row_no + 1}" if row_no else ""
        raise DataError(
            f"prepare: cannot read {f} as {kind}{where} ({type(e).__name__}: {msg}); check the file's format"
        ) from None


class _Stats:
    def __init__(self) -> None:
        self.files = 0
        self.documents = 0
        self.bytes = 0


def _pieces(files: list[Path], text_field: str | None, cap: int | None, stats: _Stats) -> Iterator[tuple[bool, bytes]]:
    """Every input's pieces in order, stopping after `cap` bytes of text (a cut mid-document included)."""
    for f in files:
        table = f.suffix.lower() in TABLE_SUFFIXES
        source = _table_pieces(f, text_field) if table else _text_pieces(f)
        counted = False
        for new_doc, data in source:
            if not counted:
                stats.files += 1
                counted = True
            if cap is not None and stats.bytes + len(data) > cap:
                data = data[: cap - stats.bytes]
            stats.documents += new_doc
            stats.bytes += len(data)
            yield new_doc, data
            if cap is not None and stats.bytes >= cap:
                return


def _chunks(pieces: Iterable[tuple[bool, bytes]]) -> Iterator[list[tuple[bool, bytes]]]:
    chunk: list[tuple[bool, bytes]] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[1])
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------- tokenizers


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"prepare --tokenizer/--train-tokenizer: the `tokenizers` package is missing; {INSTALL_HINT}") from None
    return tokenizers


def load_tokenizer(path: Path) -> tuple[Any, Path, int | None]:
    """(tokenizer, its tokenizer.json, eos id or None) from a tokenizer.json or a folder holding one."""
    tokenizers = _tokenizers()
    path = Path(path)
    folder = path if path.is_dir() else None
    file = path / TOKENIZER_FILE if folder else path
    if not path.exists():
        raise DataError(f"prepare --tokenizer: {path} does not exist; pass a tokenizer.json file or a model folder holding one")
    if folder is not None and not file.is_file():
        raise DataError(
            f"prepare --tokenizer: {folder} has no {TOKENIZER_FILE}; pass a folder with a fast (tokenizers) "
            "tokenizer, or save one there with transformers' AutoTokenizer.save_pretrained"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise DataError(
            f"prepare --tokenizer: {file} is not a tokenizers tokenizer.json ({msg}); "
            "pass the tokenizer.json of a fast HuggingFace tokenizer"
        ) from None
    names = list(EOS_NAMES)
    config = (folder or file.parent) / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            names.insert(0, eos)
    return tok, file, _eos_id(tok, names)


def _eos_id(tok: Any, names: list[str]) -> int | None:
    """The first of `names` that is one of the tokenizer's added (special) tokens."""
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    for name in names:
        if name in added:
            return int(added[name])
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style pre-tokenisation, `<|endoftext|>` as id 0) trained on `texts`."""
    tokenizers = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[TRAINED_EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _vocab_size(tok: Any) -> int:
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def _encode_chunk(tok: Any, chunk: list[tuple[bool, bytes]], sep: np.ndarray, first: bool, dtype: np.dtype) -> np.ndarray:
    """Token ids of one chunk, with `sep` before every document but the stream's first."""
    texts = [data.decode("utf-8", errors="replace") for _, data in chunk]
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    parts = []
    for i, ((new_doc, _), enc) in enumerate(zip(chunk, encodings)):
        if new_doc and not (first and i == 0):
            parts.append(sep)
        parts.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _encode_bytes(chunk: list[tuple[bool, bytes]], first: bool) -> np.ndarray:
    joined = b"".join(
        (b"\n" + data) if new_doc and not (first and i == 0) else data for i, (new_doc, data) in enumerate(chunk)
    )
    return np.frombuffer(joined, dtype=np.uint8).astype(np.uint16)


# ---------------------------------------------------------------------------------------- writing


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
    if tokenizer is not None and train_vocab is not None:
        raise DataError("prepare: pass --tokenizer or --train-tokenizer, not both")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"prepare --max-bytes: {max_bytes} is not a positive number of bytes")
    if train_vocab is not None and train_vocab < MIN_TRAINED_VOCAB:
        raise DataError(
            f"prepare --train-tokenizer: vocab size {train_vocab} is below {MIN_TRAINED_VOCAB} "
            "(256 byte symbols + end-of-text); pass a larger size"
        )
    files = _input_files(list(inputs)) if inputs else default_corpus_files()
    cap = max_bytes if max_bytes is not None else (None if inputs else DEFAULT_CORPUS_BYTES)
    tok = eos = tok_file = None
    if tokenizer is not None:  # before touching the output: a bad tokenizer costs nothing
        tok, tok_file, eos = load_tokenizer(Path(tokenizer))
    elif train_vocab is not None:
        _tokenizers()

    with replace_dir(Path(out_dir), force=force, what="prepare --out", error=DataError) as tmp:
        if train_vocab is not None:
            if progress:
                from rich.console import Console

                Console(stderr=True).print(f"prepare: training a byte-level BPE, vocab {train_vocab:,}")
            texts = (d.decode("utf-8", errors="replace") for _, d in _pieces(files, text_field, cap, _Stats()))
            tok = train_tokenizer(texts, train_vocab)
            eos = _eos_id(tok, [TRAINED_EOS])
            tok.save(str(tmp / TOKENIZER_FILE))
        elif tok_file is not None:
            shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)

        vocab = 256 if tok is None else _vocab_size(tok)
        dtype = np.dtype(np.uint16 if vocab <= UINT16_VOCAB else np.uint32)
        if tok is None:
            sep = np.array([ord("\n")], dtype)
        elif eos is not None:
            sep = np.array([eos], dtype)
        else:
            sep = np.asarray(tok.encode("\n", add_special_tokens=False).ids, dtype=dtype)

        stats = _Stats()
        n_tokens, max_id = 0, -1
        total = None
        if all(f.suffix.lower() not in TABLE_SUFFIXES for f in files):
            total = sum(f.stat().st_size for f in files)
            total = min(total, cap) if cap is not None else total
        train_file = tmp / "train.bin"
        with open(train_file, "wb") as out, _progress(progress, total) as bar, ThreadPoolExecutor(2) as pool:
            task = bar.add_task("prepare", total=total, tokens=0) if bar is not None else None
            pending: collections.deque[tuple[Future, int]] = collections.deque()

            def write(ids: np.ndarray, nbytes: int) -> None:
                nonlocal n_tokens, max_id
                ids.tofile(out)
                n_tokens += len(ids)
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
                if bar is not None:
                    bar.update(task, advance=nbytes, tokens=n_tokens)

            for k, chunk in enumerate(_chunks(_pieces(files, text_field, cap, stats))):
                nbytes = sum(len(d) for _, d in chunk)
                if tok is None:
                    write(_encode_bytes(chunk, k == 0), nbytes)
                    continue
                pending.append((pool.submit(_encode_chunk, tok, chunk, sep, k == 0, dtype), nbytes))
                while len(pending) >= IN_FLIGHT:
                    fut, nb = pending.popleft()
                    write(fut.result(), nb)
            while pending:
                fut, nb = pending.popleft()
                write(fut.result(), nb)

        n_val = max(int(n_tokens * VAL_FRACTION), 1)
        if n_tokens - n_val < 2:
            raise DataError(f"prepare: only {n_tokens} tokens of text; give more input")
        _split_tail(train_file, tmp / "val.bin", n_val, dtype.itemsize)
        meta: dict[str, Any] = {
            "vocab_size": vocab,
            "dtype": dtype.name,
            "tokenizer": BYTE_TOKENIZER if tok is None else TOKENIZER_FILE,
            "train_tokens": n_tokens - n_val,
            "val_tokens": n_val,
            "max_token_id": max_id,
            "source_files": stats.files,
        }
        if tok is not None:
            meta["eos_id"] = eos
            meta["documents"] = stats.documents
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# -------------------------------------------------------------------------------------------- CLI
