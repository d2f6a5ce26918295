"""User models for the `model.factory` contract tests (importable as `models:...` from tests/)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn


class TinyLM(nn.Module):
    """Embedding -> one linear block -> head: the smallest model that honours the contract."""

    def __init__(self, vocab_size: int, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.block = TinyBlock(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(input_ids)))


class TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def tiny_lm(cfg, vocab_size):
    return TinyLM(vocab_size)


def not_a_module(cfg, vocab_size):
    return "nope"


class NaNAfter(TinyLM):
    """Returns NaN logits on training forwards whose 1-based count is in NAN_STEPS (comma list)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.calls = 0
        self.nan_calls = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls or (-1 in self.nan_calls):
                out = out * float("nan")
        return out


def nan_lm(cfg, vocab_size):
    return NaNAfter(vocab_size)
