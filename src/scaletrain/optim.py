"""Parameter groups, the AdamW factory, and learning-rate schedules as pure functions of the step.

Weight decay policy: tensors of two or more dimensions (linear weights and the embedding matrix,
which the built-in GPT ties to the output head) decay; biases and norm gains (1-D) do not. This is
nanoGPT's and Megatron's choice; decaying a tied embedding acts on the output projection too.

Every schedule but `plateau` holds no state: lr(step) is recomputed at every optimizer step, so exact
resume needs only the step count and every backend follows the same curve. `plateau` multiplies the
peak by a scale that only validation losses change; that scale lives in `TrainState` (checkpointed)
and is passed in here, so lr_at stays a pure function. Knows nothing of engines.
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


def lr_at(step: int, *, peak: float, cfg: ScheduleConfig, max_steps: int, plateau_scale: float = 1.0) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0)).

    Warmup is linear from peak/warmup to peak, so the first step never has lr 0.
    cosine: cosine decay from peak to min_lr over the steps after warmup.
    linear: linear decay to min_lr. constant: peak after warmup.
    wsd (warmup-stable-decay): peak until the last `decay_fraction` of steps, then linear to min_lr.
    step: peak * gamma ** ((step - warmup) // step_size) after warmup.
    onecycle: torch's OneCycleLR (cosine annealing, no warmup: its rise replaces it), from
        peak/div_factor up to peak over pct_start of the steps, then down to peak/(div_factor*final_div_factor).
    plateau: peak * plateau_scale after warmup (`TrainState.record_plateau` keeps the scale, floored at min_lr).
    """
    if cfg.kind == "onecycle":
        return onecycle_lr(step, peak=peak, cfg=cfg, max_steps=max_steps)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak
    if cfg.kind == "step":
        return peak * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    if cfg.kind == "plateau":
        return peak * plateau_scale
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


def onecycle_lr(step: int, *, peak: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's two-phase cosine form (three_phase=False), as a function."""
    initial = peak / cfg.div_factor
    final = initial / cfg.final_div_factor
    rise_end = float(cfg.pct_start * max_steps) - 1
    last = max_steps - 1
    step = min(step, last)

    def cos_anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= rise_end:
        return cos_anneal(initial, peak, step / rise_end if rise_end > 0 else 1.0)
    return cos_anneal(peak, final, (step - rise_end) / max(last - rise_end, 1e-12))
