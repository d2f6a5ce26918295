"""User models that misbehave on purpose, for the launch tests (importable as `fault_models:...` with
tests/ on PYTHONPATH). Test-only: nothing in the package knows about them.

- `crash_lm`: raises on rank FAULT_RANK (default 1) in the forward of training step FAULT_STEP
  (1-based, default 3), so the tests can check that every rank exits, and in bounded time. With
  FAULT_MARK set, the failing rank first writes the time of the fault (time.time()) to that file.
- `grad_spike_lm`: finite loss, overflowing fp16 gradients at training forward FAULT_STEP.
- `slow_build_lm`: sleeps SLOW_BUILD_S seconds while it is built (start-up signals).
- `slow_lm`: sleeps SLOW_STEP_S seconds (default 0.2) in every training forward, so a test can send
  a signal while a run is still going. The sleep changes no number: losses equal `models:tiny_lm`'s.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from models import TinyLM


class CrashAt(TinyLM):
    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.calls = 0
        self.rank = int(os.environ.get("FAULT_RANK", "1"))
        self.step = int(os.environ.get("FAULT_STEP", "3"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if rank == self.rank and self.calls == self.step:
                if mark := os.environ.get("FAULT_MARK"):
                    with open(mark, "w") as f:
                        f.write(repr(time.time()))
                raise RuntimeError(f"injected fault on rank {rank} at training forward {self.calls}")
        return super().forward(input_ids)


class SlowLM(TinyLM):
    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.delay = float(os.environ.get("SLOW_STEP_S", "0.2"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
        return super().forward(input_ids)


def crash_lm(cfg, vocab_size):
    return CrashAt(vocab_size)


def slow_lm(cfg, vocab_size):
    return SlowLM(vocab_size)


class GradSpikeAt(TinyLM):
    """Finite loss, but in backward of training forward FAULT_STEP the output gradient is multiplied
    by 1e10: fp16 gradients overflow to inf while the loss stays finite (the loss scaler's case)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.calls = 0
        self.step = int(os.environ.get("FAULT_STEP", "1"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = super().forward(input_ids)
        if self.training:
            self.calls += 1
            if self.calls == self.step:
                logits.register_hook(lambda g: g * 1e10)
        return logits


def grad_spike_lm(cfg, vocab_size):
    return GradSpikeAt(vocab_size)


class SlowBuild(TinyLM):
    """Sleeps SLOW_BUILD_S seconds (default 3) in its constructor: a window to signal a starting run."""

    def __init__(self, vocab_size: int) -> None:
        time.sleep(float(os.environ.get("SLOW_BUILD_S", "3")))
        super().__init__(vocab_size)


def slow_build_lm(cfg, vocab_size):
    return SlowBuild(vocab_size)
