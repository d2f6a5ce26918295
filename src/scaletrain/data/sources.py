"""Where each rank's micro-batches come from: a token folder, or the user's datasets (`data.factory`).

Both are stateless in the same way: the examples of optimizer step `s` are a pure function of
(seed, s), a rank takes its contiguous slice of each global batch and cuts it into micro-batches, so
resume needs only the step and 1 and N ranks see the same global batches.

Datasets (map-style: a torch `Dataset` or a HuggingFace `datasets.Dataset`) are read in epochs: the
order of epoch `e` is a permutation drawn from (seed, e); step `s` takes global batch `s mod
steps_per_epoch` of epoch `s div steps_per_epoch`; the last partial global batch of an epoch is
dropped. A torch DataLoader with `data.num_workers` workers (and pinned memory on CUDA) collates
ahead of the loop. Evaluation reads every validation example exactly once: each rank takes a
contiguous share (sizes differ by at most one), and a rank whose share runs out first runs its
remaining forwards on a filler batch that is not counted, since sharded backends need every rank
in every forward.
Imports: numpy, torch, `scaletrain.data.tokens`, `scaletrain.errors`, `scaletrain.hooks`, `scaletrain.objective`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scaletrain.data.tokens import Batches, BatchPlan
from scaletrain.errors import ConfigError, DataError
from scaletrain.hooks import import_callable
from scaletrain.objective import TokenBatch

# Keys the default collate may pad, and with what (None: data.pad_id / data.ignore_index).
PADDED_KEYS = {"input_ids": "pad_id", "labels": "ignore_index", "attention_mask": 0, "token_type_ids": 0}
_EPOCH_STREAM = 2 * 2**40  # Philox counter space apart from the token sampler's streams


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in epoch `epoch`: a pure function of its inputs."""
    rng = np.random.Generator(np.random.Philox(key=[seed, _EPOCH_STREAM + epoch]))
    return rng.permutation(n)


# ------------------------------------------------------------------ collate


def _as_tensor(key: Any, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"data.collate: field {key!r} holds {type(value).__name__} values, which the default "
                        "collate cannot turn into tensors; set data.collate='pkg.module:fn'") from None


def _collate_field(key: Any, values: list[Any], pad_id: int, ignore_index: int) -> torch.Tensor:
    tensors = [_as_tensor(key, v) for v in values]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    pad = PADDED_KEYS.get(key) if isinstance(key, str) else None
    if pad is None or any(t.dim() != 1 for t in tensors):
        raise DataError(f"data.collate: field {key!r} has examples of different shapes and the default collate "
                        f"pads only 1-D {sorted(PADDED_KEYS)}; set data.collate='pkg.module:fn'")
    value = {"pad_id": pad_id, "ignore_index": ignore_index}.get(pad, pad)
    out = torch.full((len(tensors), max(len(t) for t in tensors)), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : len(t)] = t
    return out


def default_collate(examples: Sequence[Any], *, pad_id: int = 0, ignore_index: int = -100) -> Any:
    """Stack equal shapes; right-pad variable-length `input_ids` (with `pad_id`), `labels` (with
    `ignore_index`, so padding is never counted), `attention_mask` and `token_type_ids` (with 0).
    Mappings give a dict, tuples a tuple, tensors a tensor."""
    first = examples[0]
    if isinstance(first, Mapping):
        return {k: _collate_field(k, [e[k] for e in examples], pad_id, ignore_index) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(_collate_field(i, [e[i] for e in examples], pad_id, ignore_index) for i in range(len(first)))
    return _collate_field(None, list(examples), pad_id, ignore_index)


class _Collate:
    """Picklable for DataLoader workers: the user's collate by name (`fn`, when given, is that function
    already imported; a worker process imports it by name), or the default."""

    def __init__(self, spec: str | None, pad_id: int, ignore_index: int,
                 fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.spec, self.pad_id, self.ignore_index = spec, pad_id, ignore_index
        self._fn = fn

    def __call__(self, examples: list[Any]) -> Any:
        if self.spec is None:
            return default_collate(examples, pad_id=self.pad_id, ignore_index=self.ignore_index)
        if self._fn is None:
            self._fn = import_callable(self.spec, "data.collate")
        return self._fn(examples)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fn": None}


# ------------------------------------------------------------------ datasets from a factory


def load_datasets(spec: str) -> tuple[Any, Any]:
    """Call `data.factory` and check what it returns; every problem is one line naming the key."""
    fn = import_callable(spec, "data.factory")
    result = fn()
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ConfigError(f"data.factory: {spec} returned {type(result).__name__}; return a (train, val) pair "
                          "of map-style datasets")
    for split, ds in zip(("train", "val"), result):
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise ConfigError(f"data.factory: the {split} dataset ({type(ds).__name__}) is not map-style; it needs "
                              "__len__ and __getitem__ (an IterableDataset is not supported)")
        if len(ds) == 0:
            raise ConfigError(f"data.factory: the {split} dataset is empty")
        example = ds[0]
        if not isinstance(example, (Mapping, tuple, list, torch.Tensor)):
            raise ConfigError(f"data.factory: {split}[0] is a {type(example).__name__}; examples must be mappings "
                              "(of tensors, numbers or lists), tuples, or tensors")
    return result[0], result[1]


class _StepSampler:
    """Index lists of this rank's micro-batches, step after step from `start` (a DataLoader batch_sampler)."""

    def __init__(self, source: DatasetSource, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.source.micro_indices(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.source.plan.grad_accum


class DatasetSource:
    """This rank's micro-batches from a (train, val) pair of map-style datasets."""

    fixed_count = False

    def __init__(self, train: Any, val: Any, *, plan: BatchPlan, rank: int, seed: int, max_steps: int,
                 collate: str | None, pad_id: int, ignore_index: int, num_workers: int, pin_memory: bool,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.train_set, self.val_set = train, val
        self.plan, self.rank, self.seed, self.max_steps = plan, rank, seed, max_steps
        self.collate = _Collate(collate, pad_id, ignore_index, collate_fn)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = len(train) // plan.global_batch_size
        self._orders: dict[int, np.ndarray] = {}
        self._iter: Iterator[Any] | None = None
        self._next_step = -1

    @property
    def reference_count(self) -> int:
        return self.plan.micro_batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.train_set), self.seed, epoch)}
        return self._orders[epoch]

    def micro_indices(self, step: int) -> list[list[int]]:
        p = self.plan
        epoch, j = divmod(step, self.steps_per_epoch)
        g = self._order(epoch)[j * p.global_batch_size : (j + 1) * p.global_batch_size]
        per_rank = p.micro_batch_size * p.grad_accum
        mine = g[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[m * p.micro_batch_size : (m + 1) * p.micro_batch_size].tolist() for m in range(p.grad_accum)]

    def _loader(self, sampler: Any) -> torch.utils.data.DataLoader:
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, collate_fn=self.collate, num_workers=workers,
            pin_memory=self.pin_memory, prefetch_factor=4 if workers else None,
        )

    def train_micro_batches(self, step: int) -> list[Any]:
        """The micro-batches of optimizer step `step` for this rank, in order (prefetched by workers)."""
        if self._iter is None or step != self._next_step:
            self._iter = iter(self._loader(_StepSampler(self, step, self.max_steps)))
        self._next_step = step + 1
        return [next(self._iter) for _ in range(self.plan.grad_accum)]

    def eval_batches(self, _num_batches: int) -> Iterator[tuple[Any, bool]]:
        """Every validation example once over all ranks; (batch, counted) pairs, the same number on each."""
        n, world, b = len(self.val_set), self.plan.world_size, self.plan.micro_batch_size
        base, extra = divmod(n, world)
        start = self.rank * base + min(self.rank, extra)
        mine = list(range(start, start + base + (self.rank < extra)))
        for k in range(math.ceil(math.ceil(n / world) / b)):
            idx = mine[k * b : (k + 1) * b]
            counted = bool(idx)
            yield self.collate([self.val_set[i] for i in (idx or [0])]), counted

    def close(self) -> None:
        self._iter = None  # worker processes end with their iterator


class TokenSource:
    """Micro-batches of a token folder (`data.Batches`) as `TokenBatch`es; every token counts."""

    fixed_count = True

    def __init__(self, batches: Batches, block_size: int) -> None:
        self.batches, self.block_size = batches, block_size

    @property
    def reference_count(self) -> int:
        return self.batches.plan.micro_batch_size * self.block_size

    def train_micro_batches(self, step: int) -> list[TokenBatch]:
        return [TokenBatch(x, y) for x, y in self.batches.train_micro_batches(step)]

    def eval_batches(self, num_batches: int) -> Iterator[tuple[TokenBatch, bool]]:
        for i in range(num_batches):
            yield TokenBatch(*self.batches.val_batch(i)), True

    def close(self) -> None:
        pass
