"""Token data: the data folder's meta, memmap loading, and stateless distributed batch sampling.

A data folder holds `train.bin` and `val.bin` (flat token ids, numpy uint16 or uint32) and
`meta.json` (vocab_size, dtype, tokenizer, token counts), plus `tokenizer.json` when the ids come
from a tokenizer; `scaletrain.data.prepare` writes them. A nanoGPT folder (the bins, no meta.json) is read
as uint16 ids given `data.vocab_size`; its meta.pkl is never opened. No pickle anywhere.

Sampling is a pure function: the start offset of sequence `i` of optimizer step `s` comes from a
generator seeded with (seed, s), so resume needs only the step, and a run on 1 rank and one on N
ranks see the same global batches. A rank takes the contiguous slice of the global batch that its
rank index names, then cuts it into micro-batches. Knows nothing of engines.
Imports: numpy, torch, `scaletrain.data.format`, `scaletrain.errors`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaletrain.data.format import DataMeta
from scaletrain.errors import DataError

log = logging.getLogger(__name__)


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
