"""Token data: the data folder's meta, memmap loading, and stateless distributed batch sampling.

A data folder holds `train.bin` and `val.bin` (flat token ids, numpy uint16 or uint32) and
`meta.json` (vocab_size, dtype, tokenizer, token counts), plus `tokenizer.json` when the ids come
from a tokenizer; `scaletrain.prepare` writes them. A nanoGPT folder (the bins, no meta.json) is read
as uint16 ids given `data.vocab_size`; its meta.pkl is never opened. No pickle anywhere.

Sampling is a pure function: the start offset of sequence `i` of optimizer step `s` comes from a
generator seeded with (seed, s), so resume needs only the step, and a run on 1 rank and one on N
ranks see the same global batches. A rank takes the contiguous slice of the global batch that its
rank index names, then cuts it into micro-batches. Knows nothing of engines.
Imports: numpy, torch, `scaletrain.errors`; `scaletrain.prepare` lazily, for the `prepare` alias.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaletrain.errors import DataError

log = logging.getLogger(__name__)

BYTE_TOKENIZER = "bytes"  # token id = byte value; vocab 256
TOKENIZER_FILE = "tokenizer.json"  # a HuggingFace `tokenizers` tokenizer, stored in the data folder
NANOGPT_DTYPE = "uint16"  # what a folder without meta.json is read as (nanoGPT's own choice)


def prepare(inputs: list[Path], out_dir: Path, **kwargs: Any) -> dict:
    """`scaletrain.prepare.prepare`, kept here for callers that import it from this module."""
    from scaletrain.prepare import prepare as _prepare

    return _prepare(inputs, out_dir, **kwargs)


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
    tok = path / TOKENIZER_FILE if meta.get("tokenizer") == TOKENIZER_FILE else None
    return DataMeta(vocab, dtype, counts["train"], counts["val"], tok if tok and tok.is_file() else None)




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
