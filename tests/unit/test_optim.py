from __future__ import annotations

import itertools
import math

import pytest
import torch

from scaletrain.config import ModelConfig, ScheduleConfig
from scaletrain.model.gpt import GPT
from scaletrain.optim import lr_at, param_groups


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedules_shape(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, min_lr=0.1)
    lrs = [lr_at(s, peak=1.0, cfg=cfg, max_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup, never 0
    assert all(b >= a for a, b in itertools.pairwise(lrs[:10]))
    if kind == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1)  # ends at min_lr
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs[10:]))
    if kind == "wsd":
        assert lrs[79] == 1.0 and lrs[81] < 1.0
    if kind == "cosine":
        assert lrs[10 + 89 // 2] == pytest.approx(0.55, abs=0.02)
    assert all(math.isfinite(x) for x in lrs)


def test_weight_decay_on_matrices_only():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=True), vocab_size=16)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # the tied matrix counted once
    assert no_decay["weight_decay"] == 0.0 and isinstance(decay["params"][0], torch.nn.Parameter)
