"""The built-in training loop: phases over one `Run`, the same for every backend.

`train(plan, ctx)` takes the run folder's lease, builds the `Run` (engine, data, resume), then steps:
each step is a train step, its record, an evaluation when one is due, the callbacks, the stop vote and
a save when the checkpoint manager says so. Every policy is decided by the component that owns it
(`EvalCadence`, `StepLog`, `CheckpointManager.should_save`, `TrainState.check_skipped`); the loop only
puts them in order. It never asks which backend it has. Rank-0-only work is limited to the metrics
sink and the checkpoint manifest; evaluation runs on every rank (a rank-0-only forward hangs FSDP and
ZeRO-3).
Imports: `scaletrain.dist`, `scaletrain.errors`, `scaletrain.model.build`, `scaletrain.train` (`callbacks`, `lease`,
`plan`, `run`, `stop`; `plot` when logging.plot is on, `trial` only in a sweep trial).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scaletrain import dist
from scaletrain.errors import ConfigError
from scaletrain.model.build import count_params
from scaletrain.train.callbacks import Callback
from scaletrain.train.lease import RunInUseError, RunLock
from scaletrain.train.plan import RunPlan, plan_run, resolve_batch
from scaletrain.train.run import Run
from scaletrain.train.step import StepOutcome
from scaletrain.train.stop import StopRequest

log = logging.getLogger(__name__)

__all__ = ["RunResult", "StopRequest", "plan_run", "resolve_batch", "train"]


@dataclass
class RunResult:
    last_step: int
    preempted: bool = False  # stopped by SIGUSR1/SIGTERM
    stopped: bool = False  # stopped at a callback's request
    stop_saved: bool = True  # the checkpoint of a preemption or requested stop was committed
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    latest_checkpoint: Path | None = None  # the tag `ckpt/latest` names after the run
    best_checkpoint: Path | None = None  # the tag `ckpt/best` names (lowest validation loss), if any


def train(plan: RunPlan, ctx: dist.DistContext, callbacks: Sequence[Callback] = (),
          stop: StopRequest | None = None) -> RunResult:
    """Collective. The whole run on an initialised process group."""
    stop = stop or StopRequest()
    callbacks = [*callbacks, *_env_callbacks()]
    stop.install()  # before the engine is built: a signal during start-up is a clean stop too
    lock = _lock_run_dir(plan.cfg.run.out_dir, ctx)
    try:
        return _train_locked(plan, ctx, callbacks, stop)
    finally:
        if lock is not None:
            lock.release()


def _env_callbacks() -> list[Callback]:
    """Callbacks a parent process asks for through the environment: a sweep names its trial there."""
    from scaletrain.train.trial import ENV_TRIAL, trial_callback_from_env

    return [trial_callback_from_env()] if os.environ.get(ENV_TRIAL) else []


def _lock_run_dir(run_dir: Path, ctx: dist.DistContext) -> RunLock | None:
    """Collective. Rank 0 takes the run folder's lease; every rank raises the same error if it can't."""
    lock, err = None, None
    if ctx.is_main:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunInUseError as e:
            lock, err = None, str(e)
    err = dist.broadcast_object(err)
    if err:
        raise RunInUseError(err)
    return lock


def _train_locked(plan: RunPlan, ctx: dist.DistContext, callbacks: Sequence[Callback],
                  stop: StopRequest) -> RunResult:
    if ctx.is_main:
        (plan.cfg.run.out_dir / "config.json").write_text(json.dumps(plan.cfg.to_json_dict(), indent=2) + "\n")
    dist.barrier()
    run = Run(plan, ctx, callbacks)
    result = RunResult(last_step=run.state.step, best_val_loss=run.state.best_val_loss)
    try:
        _announce(run)
        run.callbacks.train_start(run.info, run.state)
        _steps(run, stop, result)
        run.ckpt.finish_pending()
    except BaseException:
        run.callbacks.train_end(run.info, run.state, None)
        raise
    finally:
        stop.restore()
        run.close()
    _finish(run, result)
    return result


def _announce(run: Run) -> None:
    """Local. One line: what is trained, how the global batch is made, which steps this invocation runs."""
    plan, batch = run.plan, run.plan.batch
    per_step = (f"{batch.global_batch_size * run.cfg.model.block_size} tokens/step" if plan.datasets is None
                else f"{run.source.steps_per_epoch} steps/epoch")
    log.info("%s | %s params | global batch %d = micro %d x accum %d x data-parallel %d | %s | steps %d..%d",
             run.engine.name, f"{count_params(run.engine.module):,}", batch.global_batch_size,
             batch.micro_batch_size, batch.grad_accum, batch.world_size, per_step, run.state.step + 1,
             run.cfg.train.max_steps)


def _finish(run: Run, result: RunResult) -> None:
    """Local. The result's pointers, the callbacks' end, and the curves when logging.plot asks for them."""
    result.best_val_loss = run.state.best_val_loss
    result.latest_checkpoint, result.best_checkpoint = run.ckpt.pointers()
    run.callbacks.train_end(run.info, run.state, result)
    if run.cfg.logging.plot and run.ctx.is_main:
        from scaletrain.train.plot import write_curves

        write_curves(run.cfg.run.out_dir)


def _steps(run: Run, stop: StopRequest, result: RunResult) -> None:
    """Collective. The step loop, from the resumed step to max_steps, stop_at or an agreed stop."""
    if _stopped_before_start(run, stop, result):
        return
    if run.cfg.train.eval_only:
        _eval_only(run, result)
        return
    while run.state.step < run.cfg.train.max_steps:
        out = run.step(votes=(stop.requested, run.callbacks.stop_vote))
        done = run.state.step
        record = run.log.record(run.state, out, is_last=run.is_last(done))
        val_loss, improved = _maybe_evaluate(run, record, result)
        run.callbacks.step_end(run.info, run.state, record)
        result.last_step = done
        run.state.check_skipped(run.cfg.train.max_skipped_steps)
        requested = _agree_stop(run, out, val_loss, result)
        if run.ckpt.should_save(done, is_last=run.is_last(done) or requested, improved=improved):
            saved = run.save(val_loss)
            result.stop_saved = saved or not requested
        if requested:
            log.warning("stop requested by %s: %s step %d", "a signal" if result.preempted else "a callback",
                        "saved" if result.stop_saved else "could NOT save", done)
        if requested or done == run.cfg.train.stop_at:
            break


def _stopped_before_start(run: Run, stop: StopRequest, result: RunResult) -> bool:
    """Collective. A signal that came during start-up: stop before training (the resumed checkpoint stands)."""
    if dist.all_reduce_sum([float(stop.requested)], run.ctx.device)[0] > 0:
        log.warning("stop requested by a signal before the first step; exiting with nothing new to save")
        result.preempted = True
        return True
    return False


def _maybe_evaluate(run: Run, record: dict, result: RunResult) -> tuple[float | None, bool]:
    """Collective when due. (validation loss, whether it is the best so far); (None, False) when no
    evaluation was due. The loss and metrics join the step's record; the plateau schedule sees it."""
    done = run.state.step
    if not run.evals.due(done, is_last=run.is_last(done)):
        return None, False
    val_loss, metrics = run.evaluate()
    record["val_loss"] = result.final_val_loss = val_loss
    record.update({f"val_{name}": value for name, value in metrics.items()})
    improved = run.state.record_eval(val_loss)
    if run.cfg.schedule.kind == "plateau":
        run.state.record_plateau(val_loss, run.cfg.schedule, run.cfg.optim.lr)
    return val_loss, improved


def _agree_stop(run: Run, out: StepOutcome, val_loss: float | None, result: RunResult) -> bool:
    """Collective after an evaluation. Whether every rank stops after this step: a signal (its votes rode
    the step's loss all-reduce) or a callback's request (at an evaluation, agreed right away)."""
    signals, asks = out.votes
    if val_loss is not None:
        run.callbacks.eval(run.info, run.state, val_loss)
        asks = dist.all_reduce_sum([float(run.callbacks.stop_vote)], run.ctx.device)[0]
    result.preempted, result.stopped = signals > 0, asks > 0 and not signals > 0
    return result.preempted or result.stopped


def _eval_only(run: Run, result: RunResult) -> None:
    """Collective. train.eval_only: one evaluation of the loaded weights, logged; nothing trained or saved."""
    cfg, state = run.cfg, run.state
    if state.step == 0 and cfg.model.init_from is None:
        raise ConfigError(f"train.eval_only: no checkpoint in {cfg.run.out_dir}/ckpt and no model.init_from; "
                          "point run.out_dir at a trained run or set model.init_from")
    val_loss, metrics = run.evaluate()
    result.final_val_loss, result.last_step = val_loss, state.step
    record = {"step": state.step, "val_loss": val_loss, **{f"val_{k}": v for k, v in metrics.items()}, "eval_only": True}
    run.callbacks.step_end(run.info, state, record)
    run.callbacks.eval(run.info, state, val_loss)
    log.info("eval_only: validation loss %.4f at step %d", val_loss, state.step)
