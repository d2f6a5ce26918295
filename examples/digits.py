"""Handwritten-digit classification (scikit-learn's bundled 8x8 digits, no download): a non-LM task.

Run from the repository root (2 processes, DDP):

    PYTHONPATH=examples torchrun --standalone --nproc_per_node=2 launch/train.py \\
        --config examples/digits.toml run.out_dir=runs/digits

Every hook the harness calls is named in digits.toml:
  data.factory    -> datasets(): (train, val) map-style datasets of (pixels, label) tuples
  model.factory   -> model(cfg, vocab_size): a small MLP (the harness passes cfg; vocab_size is unused)
  model.loss_fn   -> loss(outputs, batch): (summed cross entropy, examples), exact over the global batch
  eval.metrics_fn -> accuracy(outputs, batch): {"accuracy": (correct, examples)}, logged as val_accuracy
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

N_VAL = 297  # of 1797 images; the rest train


def datasets() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # a fixed split
    x, y = x[order], y[order]
    return TensorDataset(x[N_VAL:], y[N_VAL:]), TensorDataset(x[:N_VAL], y[:N_VAL])


class MLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def model(cfg, vocab_size=None) -> nn.Module:
    return MLP(hidden=cfg.n_embd)


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]):
    labels = batch[1]
    return F.cross_entropy(outputs.float(), labels, reduction="sum"), labels.numel()


def accuracy(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]):
    labels = batch[1]
    return {"accuracy": ((outputs.argmax(-1) == labels).sum(), labels.numel())}
