"""`TrainState`: everything the loop counts, owned by the loop and saved once per checkpoint.

Engines hold no clock: the loop passes the learning rate of each step, so the step count lives here
alone. The state travels as the checkpoint's client state (flat keys, plus every rank's RNG state),
so exact resume needs nothing else. Skipped (non-finite) steps are counted here too, and
`check_skipped` stops a run that skips too many in a row. The `plateau` schedule's state (ReduceLROnPlateau on the
validation loss) is four of those counters, updated by `record_plateau` at each evaluation with the
all-reduced loss, so every rank holds the same scale and a resumed run continues it exactly.
Imports: torch (RNG state only), `scaletrain.config`, `scaletrain.errors`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from scaletrain.config import ScheduleConfig
from scaletrain.errors import TrainingError


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps, skipped ones included (the schedule follows it)
    tokens: int = 0  # tokens consumed by those steps, over the global batch
    skipped_in_row: int = 0  # non-finite steps in a row (train.max_skipped_steps stops the run)
    skipped_total: int = 0
    best_val_loss: float | None = None
    # schedule.kind=plateau: lr = peak * plateau_scale (see `record_plateau`)
    plateau_scale: float = 1.0
    plateau_best: float | None = None
    plateau_bad: int = 0  # evaluations since the last improvement
    plateau_cooldown: int = 0  # evaluations left before counting again

    def client_state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """What a checkpoint stores: these counters and the RNG state of every rank."""
        return {**asdict(self), "rng": rngs}

    @classmethod
    def from_client_state(cls, state: dict[str, Any] | None) -> TrainState:
        """The saved counters; keys an older checkpoint lacks keep their defaults."""
        state = state or {}
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def record_step(self, *, skipped: bool, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0
        self.skipped_total += int(skipped)

    def check_skipped(self, limit: int) -> None:
        """Raise once more than `limit` (train.max_skipped_steps) steps in a row were not finite."""
        if self.skipped_in_row > limit:
            raise TrainingError(
                f"{self.skipped_in_row} non-finite steps in a row (train.max_skipped_steps={limit}) at step "
                f"{self.step}; the last good checkpoint is untouched; lower optim.lr or use precision=bf16"
            )

    def record_eval(self, val_loss: float) -> bool:
        """Returns True when `val_loss` is the best so far."""
        better = self.best_val_loss is None or val_loss < self.best_val_loss
        if better:
            self.best_val_loss = val_loss
        return better

    def record_plateau(self, val_loss: float, cfg: ScheduleConfig, peak: float) -> bool:
        """torch's ReduceLROnPlateau (mode min, threshold_mode rel) on the validation loss; returns True
        when it cut the learning rate. The cut never takes the lr below schedule.min_lr."""
        if self.plateau_best is None or val_loss < self.plateau_best * (1.0 - cfg.threshold):
            self.plateau_best, self.plateau_bad = val_loss, 0
        else:  # a NaN loss is never an improvement
            self.plateau_bad += 1
        if self.plateau_cooldown > 0:
            self.plateau_cooldown -= 1
            self.plateau_bad = 0
        if self.plateau_bad <= cfg.patience:
            return False
        self.plateau_bad, self.plateau_cooldown = 0, cfg.cooldown
        new = max(self.plateau_scale * cfg.factor, cfg.min_lr / peak)
        if self.plateau_scale - new <= 1e-12:
            return False
        self.plateau_scale = new
        return True


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
