"""The step, onecycle and plateau schedules against torch's own schedulers."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import ScheduleConfig
from scaletrain.optim import lr_at
from scaletrain.train.state import TrainState


def _torch_lrs(make, steps: int, peak: float) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_matches_closed_form_and_steplr():
    cfg = ScheduleConfig(kind="step", warmup_steps=0, gamma=0.5, step_size=7, min_lr=0.0)
    ours = [lr_at(s, peak=0.3, cfg=cfg, max_steps=40) for s in range(40)]
    assert ours == pytest.approx([0.3 * 0.5 ** (s // 7) for s in range(40)])
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 40, 0.3)
    assert ours == pytest.approx(ref, rel=1e-12)
    warm = ScheduleConfig(kind="step", warmup_steps=4, gamma=0.5, step_size=7, min_lr=0.0)
    assert lr_at(0, peak=0.3, cfg=warm, max_steps=40) == pytest.approx(0.075)  # warmup first
    assert lr_at(4 + 7, peak=0.3, cfg=warm, max_steps=40) == pytest.approx(0.15)  # then counted from its end


@pytest.mark.parametrize("steps,pct,div,final", [(50, 0.3, 25.0, 1e4), (17, 0.25, 10.0, 100.0)])
def test_onecycle_matches_torch(steps, pct, div, final):
    cfg = ScheduleConfig(kind="onecycle", warmup_steps=5, pct_start=pct, div_factor=div, final_div_factor=final,
                         min_lr=0.0)
    ours = [lr_at(s, peak=0.01, cfg=cfg, max_steps=steps) for s in range(steps)]
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.01, total_steps=steps, pct_start=pct, div_factor=div, final_div_factor=final,
        cycle_momentum=False), steps, 0.01)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours[0] == pytest.approx(0.01 / div) and ours[-1] == pytest.approx(0.01 / div / final)
    assert max(ours) == pytest.approx(0.01, rel=0.01)


def _plateau_trace(losses, cfg, peak):
    state, out = TrainState(), []
    for v in losses:
        state.record_plateau(v, cfg, peak)
        out.append(lr_at(10_000, peak=peak, cfg=cfg, max_steps=20_000, plateau_scale=state.plateau_scale))
    return out


@pytest.mark.parametrize("patience,cooldown,threshold", [(0, 0, 1e-4), (2, 0, 1e-4), (1, 2, 0.05), (3, 1, 0.0)])
def test_plateau_matches_reduce_lr_on_plateau(patience, cooldown, threshold):
    cfg = ScheduleConfig(kind="plateau", warmup_steps=0, factor=0.5, patience=patience, threshold=threshold,
                         cooldown=cooldown, min_lr=0.01)
    losses = [3.0, 2.9, 2.9, 2.95, 2.89, 2.899, 2.9, 2.9, 2.5, 2.6, 2.6, 2.6, 2.6, 2.6, 2.6, 2.6, 2.6, 2.6,
              float("nan"), 2.6, 2.6, 2.6, 2.6, 2.6, 2.6]
    ours = _plateau_trace(losses, cfg, peak=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=patience, threshold=threshold,
                                                       cooldown=cooldown, min_lr=0.01)
    ref = []
    for v in losses:
        sched.step(v)
        ref.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(ref)
    assert min(ours) >= 0.01 and ours[-1] < 1.0


def test_plateau_floor_is_min_lr():
    cfg = ScheduleConfig(kind="plateau", warmup_steps=0, factor=0.5, patience=0, min_lr=0.1)
    assert _plateau_trace([1.0] * 10, cfg, peak=1.0)[-1] == pytest.approx(0.1)


def test_plateau_constant_loss_cuts_after_patience_and_survives_a_round_trip():
    cfg = ScheduleConfig(kind="plateau", warmup_steps=0, factor=0.1, patience=2, min_lr=0.0)
    state = TrainState()
    scales = []
    for i in range(7):
        state.record_plateau(1.0, cfg, 1.0)
        scales.append(state.plateau_scale)
        if i == 2:  # through the checkpoint's client state and back
            state = TrainState.from_client_state(state.client_state([]))
    # the first evaluation sets the reference; then patience (2) stalls are tolerated, the third cuts
    assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
