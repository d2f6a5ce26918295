"""Bring-your-own hooks for the tests (tests/ on PYTHONPATH): datasets, models, losses, metrics.

Test-only: nothing in the package knows about them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.model.gpt import GPT

VOCAB = 64


class VarLenDataset(torch.utils.data.Dataset):
    """Token sequences of 3..24 tokens, next-token labels, some positions ignored: counts vary a lot."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 25, (), generator=g))
            ids = torch.randint(VOCAB, (length + 1,), generator=g)
            labels = ids[1:].clone()
            labels[: int(torch.randint(0, length, (), generator=g)) // 2] = -100  # an ignored prefix
            self.items.append({"input_ids": ids[:-1], "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def varlen_datasets():
    return VarLenDataset(64, seed=1), VarLenDataset(10, seed=2)


class KwargsGPT(GPT):
    """The built-in GPT called with a mapping batch: it reads input_ids and ignores the labels."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids)


def kwargs_gpt(cfg, vocab_size=None):
    return KwargsGPT(cfg, VOCAB)


def token_loss(outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy over the labels that count, and how many count."""
    labels = batch["labels"]
    total = F.cross_entropy(outputs.float().reshape(-1, outputs.size(-1)), labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


def mean_loss_non_scalar(outputs, batch):
    return F.cross_entropy(outputs.float().reshape(-1, outputs.size(-1)), batch["labels"].reshape(-1),
                           ignore_index=-100, reduction="none")


def wrong_type_datasets():
    return 42, 43


def string_examples():
    return ["text"] * 8, ["text"] * 2
