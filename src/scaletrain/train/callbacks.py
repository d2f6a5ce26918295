"""The seam where sinks, trackers, pruning and user hooks plug into the loop.

A callback overrides any of the hooks below; the loop calls them on every rank, in the order given,
at the same points of the run (so a callback may run collectives inside a hook only if it does so on
every rank). A hook returns True to request a stop. A stop is a collective decision: requests from
`on_step_end` travel with the next step's loss all-reduce, requests from `on_eval` are agreed right
after the evaluation; then every rank saves a checkpoint and `train` returns with `stopped=True`
(exit code 0). Rank-0-only work (writing files) is the callback's own business: check `run.is_main`.

    on_train_start(run, state)        after resume, before the first step
    on_step_end(run, state, record)   after each optimizer step; `record` is what metrics.jsonl gets
    on_eval(run, state, val_loss)     after each evaluation (every rank has the same value)
    on_save(run, state, tag_dir)      after a checkpoint is committed (or queued, when async)
    on_train_end(run, state, result)  once, also after an error (result is None then)

Imports nothing of ours (so user code can subclass `Callback` without pulling in torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """What a callback may want to know about the run, identical on every rank but `rank`."""

    run_dir: Path
    rank: int
    world_size: int
    max_steps: int
    config: dict[str, Any]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Callback:
    """Base class with do-nothing hooks; override the ones you need."""

    def on_train_start(self, run: RunInfo, state: Any) -> None:
        pass

    def on_step_end(self, run: RunInfo, state: Any, record: dict[str, Any]) -> bool | None:
        return None

    def on_eval(self, run: RunInfo, state: Any, val_loss: float) -> bool | None:
        return None

    def on_save(self, run: RunInfo, state: Any, tag_dir: Path) -> None:
        pass

    def on_train_end(self, run: RunInfo, state: Any, result: Any) -> None:
        pass


class CallbackList:
    """Calls every callback in order; remembers whether any asked to stop (this rank's vote)."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        self.stop_vote = False

    def train_start(self, run: RunInfo, state: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run, state)

    def step_end(self, run: RunInfo, state: Any, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            self.stop_vote |= bool(cb.on_step_end(run, state, record))

    def eval(self, run: RunInfo, state: Any, val_loss: float) -> None:
        for cb in self.callbacks:
            self.stop_vote |= bool(cb.on_eval(run, state, val_loss))

    def save(self, run: RunInfo, state: Any, tag_dir: Path) -> None:
        for cb in self.callbacks:
            cb.on_save(run, state, tag_dir)

    def train_end(self, run: RunInfo, state: Any, result: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run, state, result)


class SinkCallback(Callback):
    """Feeds a metrics sink (`metrics.make_sink`: JSONL + console on rank 0, nothing elsewhere)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def on_train_start(self, run: RunInfo, state: Any) -> None:
        self.sink.start(run.max_steps, state.step)

    def on_step_end(self, run: RunInfo, state: Any, record: dict[str, Any]) -> None:
        self.sink.log(record, console="step_ms" in record or "val_loss" in record)

    def on_save(self, run: RunInfo, state: Any, tag_dir: Path) -> None:
        log_checkpoint = getattr(self.sink, "log_checkpoint", None)  # trackers record the tag
        if log_checkpoint is not None:
            log_checkpoint(state.step, tag_dir)

    def on_train_end(self, run: RunInfo, state: Any, result: Any) -> None:
        self.sink.close()
