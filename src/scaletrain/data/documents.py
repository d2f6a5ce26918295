"""Reading documents for `prepare`: input files (folders recursively, sorted), text files cut into
pieces at word boundaries, rows of `.jsonl` / `.parquet` / `.csv` files (their `--text-field`, read
with HF `datasets` in streaming mode), and pieces grouped into chunks of about CHUNK_BYTES.

A text file is one document and each table row is one. A text file larger than PIECE_BYTES is read in
pieces cut after a newline with a non-space character on each side: a GPT-2 style pre-tokeniser splits
there anyway, so the ids are the same as encoding the file in one go.
Imports: datasets only for tables; `scaletrain.data.format`, `scaletrain.errors`.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from scaletrain.data.format import INSTALL_HINT
from scaletrain.errors import DataError

DEFAULT_CORPUS_BYTES = 8 * 2**20
TABLE_SUFFIXES = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PIECE_BYTES = 256 * 2**10  # text files are cut into pieces of about this size (more pieces, more cores busy)
CHUNK_BYTES = 1 * 2**20  # pieces are encoded this many bytes of text at a time


def default_corpus_files() -> list[Path]:
    """The Python standard library's own sources: present on every machine, no download needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def input_files(inputs: list[Path]) -> list[Path]:
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


class Stats:
    def __init__(self) -> None:
        self.files = 0
        self.documents = 0
        self.bytes = 0


def pieces(files: list[Path], text_field: str | None, cap: int | None, stats: Stats) -> Iterator[tuple[bool, bytes]]:
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


def chunks(pieces: Iterable[tuple[bool, bytes]]) -> Iterator[list[tuple[bool, bytes]]]:
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
