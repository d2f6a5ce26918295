"""When the loop evaluates and logs, each decided by its own component (checkpoints decide theirs in
`CheckpointManager.should_save`), and what a step's metrics record holds.
Imports: torch, `scaletrain.config`, `scaletrain.train.metrics`, `scaletrain.train.state`.
"""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.config import TrainConfig
from scaletrain.train.metrics import Throughput, layer_norm_record
from scaletrain.train.state import TrainState


class EvalCadence:
    """`train.eval_steps` batches every `train.eval_every` steps and at the last step (0 batches: never)."""

    def __init__(self, train: TrainConfig) -> None:
        self.every, self.num_batches = train.eval_every, train.eval_steps

    def due(self, step: int, *, is_last: bool) -> bool:
        return bool(self.num_batches) and (is_last or bool(self.every and step % self.every == 0))


class StepLog:
    """A step's record for metrics.jsonl and the console. Every step gets the counters; every
    `train.log_every` steps, the last step and any skipped step also get speed, MFU, memory and ETA."""

    def __init__(self, train: TrainConfig, mfu: Any, device: torch.device) -> None:
        self.every, self.max_steps = train.log_every, train.max_steps
        self.mfu, self.device = mfu, device
        self.speed = Throughput()

    def due(self, step: int, *, is_last: bool, skipped: bool) -> bool:
        return step % self.every == 0 or is_last or skipped

    def record(self, state: TrainState, out: Any, *, is_last: bool) -> dict[str, Any]:
        stats = out.stats
        self.speed.add(round(out.count))
        record: dict[str, Any] = {"step": state.step, "loss": out.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                                  "tokens": state.tokens}
        if stats.skipped:
            record.update(skipped=True, skipped_total=state.skipped_total)
        if stats.loss_scale is not None:
            record["loss_scale"] = stats.loss_scale
        if out.layer_norms:
            record.update(layer_norm_record(out.layer_norms))
        if self.due(state.step, is_last=is_last, skipped=stats.skipped):
            self._add_timing(record, state.step)
        return record

    def _add_timing(self, record: dict[str, Any], step: int) -> None:
        record.update(self.speed.report())
        self.mfu.add_to(record)
        if self.device.type == "cuda":  # host-side counters: no device sync
            record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        record["eta_s"] = (self.max_steps - step) * record["step_ms"] / 1000
