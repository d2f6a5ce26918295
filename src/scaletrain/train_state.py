"""`TrainState`: everything the loop counts, owned by the loop and saved once per checkpoint.

Engines hold no clock: the loop passes the learning rate of each step, so the step count lives here
alone. The state travels as the checkpoint's client state (flat keys, plus every rank's RNG state),
so exact resume needs nothing else. Imports: torch (RNG state only), nothing of ours.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps, skipped ones included (the schedule follows it)
    tokens: int = 0  # tokens consumed by those steps, over the global batch
    skipped_in_row: int = 0  # non-finite steps in a row (train.max_skipped_steps stops the run)
    skipped_total: int = 0
    best_val_loss: float | None = None

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

    def record_eval(self, val_loss: float) -> bool:
        """Returns True when `val_loss` is the best so far."""
        better = self.best_val_loss is None or val_loss < self.best_val_loss
        if better:
            self.best_val_loss = val_loss
        return better


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
