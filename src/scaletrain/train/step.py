"""One optimizer step and one evaluation, over any engine: the two collectives a loop is made of.

Both are free functions of (engine, batches, objective, ctx) so that the built-in loop and a user's own
loop share them. Losses and metrics are sums over every counted item of every rank divided by the
count, so the global batch's loss is exact whatever padding or uneven shares do.
Imports: torch, `scaletrain.dist`, `scaletrain.engines.base`, `scaletrain.objective`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from scaletrain import dist
from scaletrain.engines.base import Engine
from scaletrain.objective import HookError, Objective, to_device


class StepOutcome(NamedTuple):
    loss: float  # the global batch's loss: summed over every counted item of every rank, / count
    stats: Any  # the engine's StepStats
    count: float  # items the global batch counted (tokens, or examples)
    votes: list[float]  # each vote summed over ranks
    layer_norms: dict[str, float] | None  # per-layer gradient norms when asked for, before clipping


def train_step(engine: Engine, micro: list, ctx: dist.DistContext, lr: float, objective: Objective,
               *, reference_count: float, dp_size: int, votes: Sequence[bool] = (),
               layer_norms: bool = False) -> StepOutcome:
    """Collective. One optimizer step over this rank's micro-batches at learning rate `lr`.

    Each micro-batch's loss sum is back-propagated divided by a constant (`reference_count`, the
    count a micro-batch usually has), and the engine multiplies the gradients by the correction
    dp x accum x reference / N before clipping, where N is the count of the whole global batch: the
    gradient is then that of the global batch's loss sum / N, whatever each micro-batch counted.
    With token data every micro-batch counts reference_count tokens and the correction is exactly 1.

    One collective besides the engine's own: the loss, the count and the stop votes (signal,
    callback) travel together. With `layer_norms`, one more (the engine's per-layer norms).
    """
    loss_sum, count = _accumulate(engine, micro, ctx, objective, reference_count)
    # Ranks of one model-parallel group hold the same micro-batches: their copies are divided out.
    replicas = ctx.world_size // dp_size
    total, n_total, *summed = dist.all_reduce_sum([loss_sum, count, *map(float, votes)], ctx.device)
    total, n_total = total / replicas, n_total / replicas
    loss_value = total / n_total if n_total else math.nan
    grad_scale = dp_size * len(micro) * reference_count / n_total if n_total else 1.0
    layers = None
    if layer_norms:  # after the last backward, before step clips and zeroes; scaled like the step will
        layers = {k: v * grad_scale for k, v in engine.layer_grad_norms().items()}
    stats = engine.step(lr, force_skip=not math.isfinite(loss_value), grad_scale=grad_scale)
    return StepOutcome(loss_value, stats, n_total, summed, layers)


def _accumulate(engine: Engine, micro: list, ctx: dist.DistContext, objective: Objective,
                reference_count: float) -> tuple[float, float]:
    """Collective (the engine's gradient sync). Forward and backward of every micro-batch: this rank's
    (loss sum, count)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for m, mb in enumerate(micro):
        mb = to_device(mb, ctx.device)
        with engine.accumulate(is_boundary=m == len(micro) - 1):
            outputs = engine.forward(mb)
            total, n = objective.loss(outputs, mb)
            engine.backward(total / reference_count)
        loss_sum += total.detach().double()
        count += n
    return float(loss_sum), float(count)


def evaluate(engine: Engine, batches: Iterable[tuple[Any, bool]], objective: Objective,
             ctx: dist.DistContext, dp_size: int) -> tuple[float, dict[str, float]]:
    """Collective. Validation loss and metrics over `batches` ((batch, counted) pairs: uncounted ones are
    forwards that keep sharded engines in step), each a sum over every counted item of every rank
    divided by the count: (loss, {metric: value})."""
    engine.train(False)
    sums = _EvalSums(ctx.device)
    with torch.no_grad():
        for batch, counted in batches:
            batch = to_device(batch, ctx.device)
            outputs = engine.forward(batch)
            if counted:
                sums.add(objective.loss(outputs, batch), objective.metrics(outputs, batch))
    engine.train(True)
    return sums.reduce(ctx.world_size // dp_size)


class _EvalSums:
    """Local sums of one evaluation: (loss sum, count) and each metric's (sum, count)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)
        self.names: list[str] | None = None
        self.extra: torch.Tensor | None = None

    def add(self, loss: tuple[torch.Tensor, Any], metrics: dict[str, Any]) -> None:
        loss_sum, count = loss
        self.totals += torch.stack([loss_sum.detach().double(),
                                    torch.as_tensor(count, dtype=torch.float64, device=self.device)])
        if self.names is None:
            self.names = sorted(metrics)
            self.extra = torch.zeros(2 * len(self.names), dtype=torch.float64, device=self.device)
        elif sorted(metrics) != self.names:
            raise HookError(f"eval.metrics_fn returned {sorted(metrics)} after {self.names}; return the same names "
                            "for every batch")
        for i, name in enumerate(self.names):
            for j, v in enumerate(metrics[name]):
                self.extra[2 * i + j] += torch.as_tensor(v, dtype=torch.float64, device=self.device).detach()

    def reduce(self, replicas: int) -> tuple[float, dict[str, float]]:
        """Collective. Ranks of one model-parallel group count the same items: their copies are divided out."""
        extra = self.extra.tolist() if self.extra is not None else []
        values = [v / replicas for v in dist.all_reduce_sum([*self.totals.tolist(), *extra], self.device)]
        out = {name: values[2 + 2 * i] / values[3 + 2 * i] if values[3 + 2 * i] else math.nan
               for i, name in enumerate(self.names or [])}
        return (values[0] / values[1] if values[1] else math.nan), out
