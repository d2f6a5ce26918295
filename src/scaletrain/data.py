"""Token data: `prepare` from text, memmap loading, and stateless distributed batch sampling.

A data folder holds `train.bin` and `val.bin` (flat token ids, numpy uint16 or uint32) and
`meta.json` (vocab_size, dtype, tokenizer, token counts): no pickle anywhere.

Sampling is a pure function: the start offset of sequence `i` of optimizer step `s` comes from a
generator seeded with (seed, s), so resume needs only the step, and a run on 1 rank and one on N
ranks see the same global batches. A rank takes the contiguous slice of the global batch that its
rank index names, then cuts it into micro-batches. Knows nothing of engines.
Imports: numpy, torch, `scaletrain.errors`, `scaletrain.fsutil`.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaletrain.errors import DataError
from scaletrain.fsutil import replace_dir

log = logging.getLogger(__name__)

BYTE_TOKENIZER = "bytes"  # token id = byte value; vocab 256
DEFAULT_CORPUS_BYTES = 8 * 2**20
VAL_FRACTION = 0.05


def _text_files(inputs: list[Path]) -> list[Path]:
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


def default_corpus_files() -> list[Path]:
    """The Python standard library's own sources: present on every machine, no download needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def prepare(inputs: list[Path], out_dir: Path, *, max_bytes: int | None = None, force: bool = False) -> dict:
    """Tokenise text files (byte-level) into `out_dir/{train,val}.bin` and `meta.json`.

    Files are read in sorted order; the last VAL_FRACTION of the stream is the validation split.
    A non-empty `out_dir` is refused unless `force`; the folder is written beside it and renamed into
    place, so an interrupted prepare leaves the old folder or the new one, never a mix.
    """
    files = _text_files(inputs) if inputs else default_corpus_files()
    cap = max_bytes if max_bytes is not None else (None if inputs else DEFAULT_CORPUS_BYTES)
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        if cap is not None and total + len(data) > cap:
            data = data[: cap - total]
        chunks.append(data)
        total += len(data)
        if cap is not None and total >= cap:
            break
    stream = np.frombuffer(b"\n".join(chunks), dtype=np.uint8).astype(np.uint16)
    n_val = max(int(len(stream) * VAL_FRACTION), 1)
    if len(stream) - n_val < 2:
        raise DataError(f"prepare: only {len(stream)} tokens of text; give more input")
    meta = {
        "vocab_size": 256,
        "dtype": "uint16",
        "tokenizer": BYTE_TOKENIZER,
        "train_tokens": int(len(stream) - n_val),
        "val_tokens": int(n_val),
        "max_token_id": int(stream.max()),
        "source_files": len(chunks),
    }
    with replace_dir(Path(out_dir), force=force, what="prepare --out", error=DataError) as tmp:
        stream[:-n_val].tofile(tmp / "train.bin")
        stream[-n_val:].tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass(frozen=True)
class DataMeta:
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int


def read_meta(path: Path) -> DataMeta:
    """Check a data folder and read its meta.json; every problem is a one-line DataError."""
    hint = f"run `scaletrain prepare --out {path}` or set data.path"
    if not path.is_dir():
        raise DataError(f"data.path: folder {path} does not exist; {hint}")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"data.path: {meta_file} is missing; {hint}")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
        vocab, dtype = meta["vocab_size"], str(meta["dtype"])
        if isinstance(vocab, bool) or not isinstance(vocab, int):
            raise TypeError(f"vocab_size {vocab!r} is not an integer")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"data.path: {meta_file} is malformed ({e}); {hint}") from None
    if vocab < 1:
        raise DataError(f"data.path: {meta_file} has vocab_size {vocab}; expected a positive integer; {hint}")
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"data.path: {meta_file} has dtype {dtype!r}; expected uint16 or uint32")
    max_id = meta.get("max_token_id")
    if max_id is not None and (isinstance(max_id, bool) or not isinstance(max_id, int) or max_id >= vocab):
        raise DataError(
            f"data.path: {meta_file} records max_token_id {max_id!r} but vocab_size {vocab}; "
            f"the tokens do not fit the vocabulary; {hint} with the right tokenizer"
        )
    itemsize = np.dtype(dtype).itemsize
    counts = {}
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        if not f.is_file():
            raise DataError(f"data.path: {f} is missing; {hint}")
        size = f.stat().st_size
        if size % itemsize:
            raise DataError(f"data.path: {f} is {size} bytes, not a whole number of {dtype} tokens")
        counts[split] = size // itemsize
        recorded = meta.get(f"{split}_tokens")
        if recorded is not None and recorded != counts[split]:
            raise DataError(
                f"data.path: {meta_file} says {split}_tokens={recorded!r} but {f} holds {counts[split]} "
                f"tokens (the bins were replaced or truncated); {hint} --force"
            )
    return DataMeta(vocab, dtype, counts["train"], counts["val"])


class TokenSplit:
    """One split as a memmap, with sequences addressed by (seed, step, index)."""

    def __init__(self, file: Path, dtype: str, block_size: int, vocab_size: int | None = None) -> None:
        self.file = file
        self.vocab_size = vocab_size
        self.tokens = np.memmap(file, dtype=np.dtype(dtype), mode="r")
        self.block_size = block_size
        # A sequence needs block_size inputs plus one target.
        self.num_starts = len(self.tokens) - block_size
        if self.num_starts < 1:
            raise DataError(
                f"model.block_size: {block_size} needs more than {len(self.tokens)} tokens in {file}; "
                "lower model.block_size or prepare more text"
            )

    def offsets(self, seed: int, step: int, count: int, stream: int = 0) -> np.ndarray:
        """Start offsets of the `count` sequences of one global batch: a pure function of its inputs."""
        rng = np.random.Generator(np.random.Philox(key=[seed, stream * 2**40 + step]))
        return rng.integers(0, self.num_starts, size=count, dtype=np.int64)

    def gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        # Checked per batch (one vectorised max), never by a scan of the file: an id past the vocabulary
        # is an IndexError on CPU and a device-side assert on CUDA.
        if self.vocab_size is not None and rows.size and int(rows.max()) >= self.vocab_size:
            raise DataError(
                f"data.path: {self.file} holds token id {int(rows.max())} but vocab_size is {self.vocab_size}; "
                "re-run `scaletrain prepare` with the model's tokenizer or raise model.vocab_size"
            )
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over ranks and micro-steps."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


class Batches:
    """This rank's micro-batches for training steps and evaluation, from one data folder."""

    def __init__(self, path: Path, meta: DataMeta, *, block_size: int, plan: BatchPlan, rank: int, seed: int):
        self.train = TokenSplit(path / "train.bin", meta.dtype, block_size, meta.vocab_size)
        self.val = TokenSplit(path / "val.bin", meta.dtype, block_size, meta.vocab_size)
        self.plan, self.rank, self.seed = plan, rank, seed

    def _rank_slice(self, offsets: np.ndarray, per_rank: int) -> np.ndarray:
        return offsets[self.rank * per_rank : (self.rank + 1) * per_rank]

    def train_micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of optimizer step `step` (0-based) for this rank, in order."""
        p = self.plan
        per_rank = p.micro_batch_size * p.grad_accum
        mine = self._rank_slice(self.train.offsets(self.seed, step, p.global_batch_size), per_rank)
        return [
            self.train.gather(mine[m * p.micro_batch_size : (m + 1) * p.micro_batch_size])
            for m in range(p.grad_accum)
        ]

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch `index` for this rank: the same fixed set at every evaluation."""
        p = self.plan
        offsets = self.val.offsets(self.seed, index, p.micro_batch_size * p.world_size, stream=1)
        return self.val.gather(self._rank_slice(offsets, p.micro_batch_size))
