"""Parameter groups, the AdamW factory, and learning-rate schedules as pure functions of the step.

Weight decay policy: tensors of two or more dimensions (linear weights and the embedding matrix,
which the built-in GPT ties to the output head) decay; biases and norm gains (1-D) do not. This is
nanoGPT's and Megatron's choice; decaying a tied embedding acts on the output projection too.

The schedule holds no state: lr(step) is recomputed at every optimizer step, so exact resume needs
only the step count and every backend follows the same curve. Knows nothing of engines.
Imports: torch, `scaletrain.config`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scaletrain.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        # A ZeRO-3 partition built under zero.Init is a flat 1-D piece; its full shape is ds_shape.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimConfig, *, device_type: str) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, fused on CUDA (one kernel per step instead of one per tensor)."""
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra
    )


def lr_at(step: int, *, peak: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0)).

    Warmup is linear from peak/warmup to peak, so the first step never has lr 0.
    cosine: cosine decay from peak to min_lr over the steps after warmup.
    linear: linear decay to min_lr. constant: peak after warmup.
    wsd (warmup-stable-decay): peak until the last `decay_fraction` of steps, then linear to min_lr.
    """
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak
    last = max(max_steps - 1, 1)
    if cfg.kind == "wsd":
        decay_start = max(cfg.warmup_steps, round(max_steps * (1.0 - cfg.decay_fraction)))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(last - decay_start, 1)
        return peak + (cfg.min_lr - peak) * min(progress, 1.0)
    progress = min((step - cfg.warmup_steps) / max(last - cfg.warmup_steps, 1), 1.0)
    if cfg.kind == "linear":
        return peak + (cfg.min_lr - peak) * progress
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
