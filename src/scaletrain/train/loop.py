"""The shared training loop: one loop for every backend. Train, evaluate, log, checkpoint, resume, stop.

`plan_run` checks everything that can be checked before a process group exists (data, batch
arithmetic, the run directory, the backend's own rules through the registry), identically on every
rank. `train` then builds the engine and runs. The loop never asks which backend it has: what differs
is behind the engine's verbs and the registry's entries, and what users add comes in as callbacks.
Rank-0-only work is limited to the metrics sink and the checkpoint manifest; evaluation runs on every
rank (a rank-0-only forward hangs FSDP and ZeRO-3).
Imports: `scaletrain.config`, `scaletrain.data` (`format`, `sources`, `tokens`), `scaletrain.objective`, `scaletrain.hooks`,
`scaletrain.dist`, `scaletrain.engines`, `scaletrain.checkpoint`, `scaletrain.train.callbacks`, `scaletrain.train.state`,
`scaletrain.train.metrics`, `scaletrain.train.flops`, `scaletrain.train.plot` (logging.plot), `scaletrain.model.build`, `scaletrain.optim`, `scaletrain.train.lease`, `scaletrain.errors`,
`scaletrain.model.materialize` (the `model.init_from` check), `scaletrain.train.trial` (only in a sweep trial).
"""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from scaletrain import dist
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config import Config, TrainConfig, resolve_grad_accum
from scaletrain.data.format import DataMeta, read_meta
from scaletrain.data.sources import TokenSource
from scaletrain.data.tokens import Batches, BatchPlan
from scaletrain.engines import registry
from scaletrain.engines.base import Engine, EngineSpec
from scaletrain.errors import ConfigError, TrainingError
from scaletrain.hooks import import_callable
from scaletrain.model.build import build_model, count_params
from scaletrain.objective import HookError, Objective, is_causal_lm, to_device
from scaletrain.optim import build_adamw, lr_at
from scaletrain.train.callbacks import Callback, CallbackList, RunInfo, SinkCallback
from scaletrain.train.flops import MFUMeter
from scaletrain.train.lease import RunInUseError, RunLock, check_free
from scaletrain.train.metrics import (
    SummaryCallback,
    Throughput,
    layer_norm_record,
    make_sink,
    truncate_metrics,
)
from scaletrain.train.state import TrainState, rng_state, set_rng_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # with train.max_steps resolved from train.epochs where that was given
    data_meta: DataMeta | None  # token folders; None for data.factory datasets
    batch: BatchPlan  # world_size here is the data-parallel size
    vocab_size: int | None
    datasets: tuple[Any, Any] | None = None  # (train, val) from data.factory


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


def resolve_batch(train: TrainConfig, dp_size: int) -> BatchPlan:
    """grad_accum from train.global_batch_size when given; a global batch that does not divide fails."""
    return BatchPlan(train.micro_batch_size, resolve_grad_accum(train, dp_size), dp_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """Everything checked before any process group exists. Raises ScaletrainError subclasses."""
    for key in ("loss_fn",):
        if getattr(cfg.model, key):
            import_callable(getattr(cfg.model, key), f"model.{key}")
    if cfg.eval.metrics_fn:
        import_callable(cfg.eval.metrics_fn, "eval.metrics_fn")
    if cfg.data.factory:
        return _plan_datasets(cfg, world_size)
    if cfg.train.epochs is not None:
        raise ConfigError("train.epochs: token folders are sampled without epochs; set train.max_steps "
                          "(or use data.factory datasets)")
    meta = read_meta(cfg.data.path, cfg.data.vocab_size)
    for split, n in (("train", meta.train_tokens), ("val", meta.val_tokens)):
        if n <= cfg.model.block_size:
            raise ConfigError(
                f"model.block_size ({cfg.model.block_size}) needs more than the {n} tokens of "
                f"{cfg.data.path}/{split}.bin; lower model.block_size or prepare more text"
            )
    vocab = cfg.model.vocab_size or meta.vocab_size
    if vocab < meta.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the data's vocab_size ({meta.vocab_size})")
    _check_common(cfg, world_size)
    batch = resolve_batch(cfg.train, registry.data_parallel_size(cfg, world_size))
    _check_run_dir(cfg)
    return RunPlan(cfg, meta, batch, vocab)


def _plan_datasets(cfg: Config, world_size: int) -> RunPlan:
    """data.factory: the datasets are built here (every rank, before any process group) and checked."""
    from scaletrain.data.sources import load_datasets

    if cfg.data.collate:
        import_callable(cfg.data.collate, "data.collate")
    train_ds, val_ds = load_datasets(cfg.data.factory)
    _check_common(cfg, world_size)
    batch = resolve_batch(cfg.train, registry.data_parallel_size(cfg, world_size))
    per_epoch = len(train_ds) // batch.global_batch_size
    if per_epoch < 1:
        raise ConfigError(f"data.factory: {len(train_ds)} training examples are fewer than one global batch "
                          f"({batch.global_batch_size}); lower train.micro_batch_size or train.global_batch_size")
    if len(val_ds) < batch.world_size:
        raise ConfigError(f"data.factory: {len(val_ds)} validation examples for {batch.world_size} data-parallel "
                          "ranks; every rank needs at least one")
    if cfg.train.epochs is not None:
        steps = cfg.train.epochs * per_epoch
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})
        if cfg.schedule.warmup_steps > steps:
            raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) exceeds the {steps} steps of "
                              f"train.epochs={cfg.train.epochs}")
    log.info("data.factory: %d training examples, %d steps per epoch of global batch %d (last partial batch "
             "dropped); %d steps", len(train_ds), per_epoch, batch.global_batch_size, cfg.train.max_steps)
    _check_run_dir(cfg)
    return RunPlan(cfg, None, batch, cfg.model.vocab_size, datasets=(train_ds, val_ds))


def _check_common(cfg: Config, world_size: int) -> None:
    if cfg.model.init_from is not None:  # a weights file, or a folder holding model.safetensors (HF)
        from scaletrain.model.materialize import check_weights_source

        check_weights_source(cfg.model.init_from)
    if cfg.train.eval_only and not cfg.train.eval_steps:
        raise ConfigError("train.eval_only needs train.eval_steps > 0")
    registry.validate(cfg, world_size)


def _check_run_dir(cfg: Config) -> None:
    """Never write over another run: a run dir with checkpoints continues only with resume=auto/path."""
    ckpt = cfg.run.out_dir / "ckpt"
    has_run = (ckpt / "latest").is_file() or (cfg.run.out_dir / "metrics.jsonl").is_file()
    if has_run and cfg.checkpoint.resume == "never":
        raise ConfigError(
            f"run.out_dir: {cfg.run.out_dir} already holds a run; use checkpoint.resume=auto to continue it "
            "or choose a new run.out_dir"
        )
    if cfg.run.out_dir.exists() and not cfg.run.out_dir.is_dir():
        raise ConfigError(f"run.out_dir: {cfg.run.out_dir} exists and is not a folder")
    check_free(cfg.run.out_dir)  # another live job on this folder: refused before start-up


class StopRequest:
    """SIGUSR1 (SLURM's warning before preemption) and SIGTERM: finish the step, save, exit 75.

    Installed before anything slow happens (the CLI does it first), so a signal during start-up is a
    clean stop too. Only the main thread may install handlers; elsewhere this is a no-op."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True  # a second signal during the save changes nothing

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            # After a stop the process is on its way out with exit 75 and a committed checkpoint. The
            # launcher may SIGTERM the slower ranks once a faster one has exited (srun
            # --kill-on-bad-exit, torchrun); that must not turn a clean stop into a crash.
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()


def make_engine(plan: RunPlan, ctx: dist.DistContext) -> Engine:
    """Collective. The configured backend's engine over the configured model and optimizer."""
    cfg = plan.cfg
    spec = EngineSpec(
        ctx=ctx,
        precision=cfg.precision,
        grad_accum=plan.batch.grad_accum,
        grad_clip=cfg.train.grad_clip,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        model_factory=lambda: build_model(cfg.model, plan.vocab_size),
        optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type=ctx.device_type),
        compile=cfg.model.compile,
        checkpoint_format=cfg.checkpoint.format,
        init_from=cfg.model.init_from,
        allow_tf32=cfg.train.allow_tf32,
    )
    engine = registry.build_engine(spec, cfg)
    # Weights come from (seed, name) whatever the backend; the RNG stream for dropout starts here, the
    # same on every backend (building on meta or under zero.Init draws nothing from it).
    torch.manual_seed(cfg.run.seed)
    return engine


def make_objective(plan: RunPlan, module: torch.nn.Module) -> Objective:
    cfg = plan.cfg
    return Objective(
        loss_fn=import_callable(cfg.model.loss_fn, "model.loss_fn") if cfg.model.loss_fn else None,
        metrics_fn=import_callable(cfg.eval.metrics_fn, "eval.metrics_fn") if cfg.eval.metrics_fn else None,
        ignore_index=cfg.data.ignore_index, causal_lm=is_causal_lm(module),
    )


def make_source(plan: RunPlan, ctx: dist.DistContext) -> Any:
    cfg = plan.cfg
    # Ranks of one tensor-parallel group (neighbours on the mesh's innermost dim) read the same data.
    rank = registry.data_parallel_rank(cfg, ctx.rank)
    if plan.datasets is not None:
        from scaletrain.data.sources import DatasetSource

        train_ds, val_ds = plan.datasets
        return DatasetSource(train_ds, val_ds, plan=plan.batch, rank=rank, seed=cfg.run.seed,
                             max_steps=cfg.train.max_steps, collate=cfg.data.collate, pad_id=cfg.data.pad_id,
                             ignore_index=cfg.data.ignore_index, num_workers=cfg.data.num_workers,
                             pin_memory=ctx.device_type == "cuda")
    batches = Batches(cfg.data.path, plan.data_meta, block_size=cfg.model.block_size,
                               plan=plan.batch, rank=rank, seed=cfg.run.seed)
    return TokenSource(batches, cfg.model.block_size)


def evaluate(engine: Engine, source: Any, objective: Objective, num_batches: int,
             ctx: dist.DistContext, dp_size: int) -> tuple[float, dict[str, float]]:
    """Collective. Validation loss and metrics, each a sum over every counted item of every rank
    divided by the count: (loss, {metric: value})."""
    engine.train(False)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    names: list[str] | None = None
    extra: torch.Tensor | None = None
    with torch.no_grad():
        for batch, counted in source.eval_batches(num_batches):
            batch = to_device(batch, ctx.device)
            outputs = engine.forward(batch)
            if not counted:
                continue
            loss_sum, count = objective.loss(outputs, batch)
            totals += torch.stack([loss_sum.detach().double(), torch.as_tensor(count, dtype=torch.float64,
                                                                              device=ctx.device)])
            metrics = objective.metrics(outputs, batch)
            if names is None:
                names = sorted(metrics)
                extra = torch.zeros(2 * len(names), dtype=torch.float64, device=ctx.device)
            elif sorted(metrics) != names:
                raise HookError(f"eval.metrics_fn returned {sorted(metrics)} after {names}; return the same names "
                                "for every batch")
            for i, name in enumerate(names):
                for j, v in enumerate(metrics[name]):
                    extra[2 * i + j] += torch.as_tensor(v, dtype=torch.float64, device=ctx.device).detach()
    engine.train(True)
    # Ranks of one tensor-parallel group count the same items: divide their copies out.
    replicas = ctx.world_size // dp_size
    values = dist.all_reduce_sum([*totals.tolist(), *(extra.tolist() if extra is not None else [])], ctx.device)
    values = [v / replicas for v in values]
    out = {name: values[2 + 2 * i] / values[3 + 2 * i] if values[3 + 2 * i] else math.nan
           for i, name in enumerate(names or [])}
    return (values[0] / values[1] if values[1] else math.nan), out


class StepOutcome(NamedTuple):
    loss: float  # the global batch's loss: summed over every counted item of every rank, / count
    stats: Any  # the engine's StepStats
    count: float  # items the global batch counted (tokens, or examples)
    votes: list[float]  # each vote summed over ranks
    layer_norms: dict[str, float] | None  # per-layer gradient norms when asked for, before clipping


def train_step(engine: Engine, micro: list, ctx: dist.DistContext, lr: float, objective: Objective,
               *, reference_count: float, dp_size: int, votes: Sequence[bool] = (),
               layer_norms: bool = False) -> StepOutcome:
    """Collective. One optimizer step over this rank's micro-batches at learning rate `lr`.

    Each micro-batch's loss sum is back-propagated divided by a constant (`reference_count`, the
    count a micro-batch usually has), and the engine multiplies the gradients by the correction
    dp x accum x reference / N before clipping, where N is the count of the whole global batch: the
    gradient is then that of the global batch's loss sum / N, whatever each micro-batch counted.
    With token data every micro-batch counts reference_count tokens and the correction is exactly 1.

    One collective besides the engine's own: the loss, the count and the stop votes (signal,
    callback) travel together. With `layer_norms`, one more (the engine's per-layer norms).
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for m, mb in enumerate(micro):
        mb = to_device(mb, ctx.device)
        with engine.accumulate(is_boundary=m == len(micro) - 1):
            outputs = engine.forward(mb)
            total, n = objective.loss(outputs, mb)
            engine.backward(total / reference_count)
        loss_sum += total.detach().double()
        count += n
    # Ranks of one tensor-parallel group hold the same micro-batches: their copies are divided out.
    replicas = ctx.world_size // dp_size
    total, n_total, *summed = dist.all_reduce_sum([float(loss_sum), float(count), *map(float, votes)], ctx.device)
    total, n_total = total / replicas, n_total / replicas
    loss_value = total / n_total if n_total else math.nan
    grad_scale = dp_size * len(micro) * reference_count / n_total if n_total else 1.0
    layers = None
    if layer_norms:  # after the last backward, before step clips and zeroes; scaled like the step will
        layers = {k: v * grad_scale for k, v in engine.layer_grad_norms().items()}
    stats = engine.step(lr, force_skip=not math.isfinite(loss_value), grad_scale=grad_scale)
    return StepOutcome(loss_value, stats, n_total, summed, layers)


class _Run:
    """One invocation of `train`: the pieces every step needs, built once."""

    def __init__(self, plan: RunPlan, ctx: dist.DistContext, callbacks: Sequence[Callback]) -> None:
        cfg = plan.cfg
        self.plan, self.cfg, self.ctx = plan, cfg, ctx
        self.info = RunInfo(cfg.run.out_dir, ctx.rank, ctx.world_size, cfg.train.max_steps, cfg.to_json_dict())
        self.engine = make_engine(plan, ctx)
        self.objective = make_objective(plan, self.engine.module)
        self.ckpt = CheckpointManager(cfg.run.out_dir / "ckpt", cfg.checkpoint, ctx)
        self.state = self._resume()
        # After resume: truncating metrics.jsonl replaces the file, so the sink opens the new one.
        self.callbacks = CallbackList([SinkCallback(make_sink(ctx.is_main, cfg.run.out_dir, cfg.logging,
                                                              self.info.config)), SummaryCallback(), *callbacks])
        self.mfu = MFUMeter.for_run(self.engine.module, cfg.model.block_size, ctx.device, cfg.precision,
                                    allow_tf32=cfg.train.allow_tf32, override=cfg.logging.peak_tflops,
                                    world_size=ctx.world_size)
        self.source = make_source(plan, ctx)

    def _resume(self) -> TrainState:
        """Collective. Load the newest intact checkpoint, restore counters and RNG."""
        client = self.ckpt.resume(self.engine)
        state = TrainState.from_client_state(client)
        if self.ctx.is_main:
            truncate_metrics(self.cfg.run.out_dir / "metrics.jsonl", state.step)
        rngs = (client or {}).get("rng") or []
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        elif client:  # world size changed: a fresh, deterministic stream per rank
            torch.manual_seed(self.cfg.run.seed + 1000 * state.step + self.ctx.rank)
        return state

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, peak=cfg.optim.lr, cfg=cfg.schedule, max_steps=cfg.train.max_steps,
                     plateau_scale=self.state.plateau_scale)

    def save(self, val_loss: float | None) -> bool:
        """Collective. Gather every rank's RNG into the client state and save one tag."""
        cfg, state = self.cfg, self.state
        client_state = state.client_state(dist.all_gather_object(rng_state()))
        meta = {
            "backend": cfg.backend.kind, "backend_spec": registry.spec_of(cfg), "world_size": self.ctx.world_size,
            "precision": cfg.precision,
            "format": self.engine.checkpoint_format, "tokens": state.tokens, "val_loss": val_loss,
            "config": self.info.config, "model": {"factory": cfg.model.factory, "vocab_size": self.plan.vocab_size},
        }
        ok = self.ckpt.save(self.engine, state.step, client_state, meta)
        if ok:
            self.callbacks.save(self.info, state, self.ckpt.dir / f"step_{state.step:08d}")
        return ok


def _record(state: TrainState, loss: float, stats: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"step": state.step, "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                              "tokens": state.tokens}
    if stats.skipped:
        record.update(skipped=True, skipped_total=state.skipped_total)
    if stats.loss_scale is not None:
        record["loss_scale"] = stats.loss_scale
    return record


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
    import os

    if not os.environ.get("SCALETRAIN_SWEEP_TRIAL"):
        return []
    from scaletrain.train.trial import trial_callback_from_env

    return [trial_callback_from_env()]


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
    cfg = plan.cfg
    if ctx.is_main:
        (cfg.run.out_dir / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    dist.barrier()
    run = _Run(plan, ctx, callbacks)
    result = RunResult(last_step=run.state.step, best_val_loss=run.state.best_val_loss)
    try:
        per_step = (f"{plan.batch.global_batch_size * cfg.model.block_size} tokens/step" if plan.datasets is None
                    else f"{run.source.steps_per_epoch} steps/epoch")
        log.info(
            "%s | %s params | global batch %d = micro %d x accum %d x data-parallel %d | %s | steps %d..%d",
            run.engine.name, f"{count_params(run.engine.module):,}", plan.batch.global_batch_size,
            plan.batch.micro_batch_size, plan.batch.grad_accum, plan.batch.world_size, per_step,
            run.state.step + 1, cfg.train.max_steps,
        )
        run.callbacks.train_start(run.info, run.state)
        _steps(run, stop, result)
        run.ckpt.finish_pending()
    except BaseException:
        run.callbacks.train_end(run.info, run.state, None)
        raise
    finally:
        stop.restore()
        run.source.close()
        run.engine.close()
    result.best_val_loss = run.state.best_val_loss
    result.latest_checkpoint, result.best_checkpoint = run.ckpt.pointers()
    run.callbacks.train_end(run.info, run.state, result)
    if cfg.logging.plot and ctx.is_main:
        from scaletrain.train.plot import write_curves

        write_curves(cfg.run.out_dir)
    return result


def _steps(run: _Run, stop: StopRequest, result: RunResult) -> None:
    """Collective. The step loop, from the resumed step to max_steps, stop_at or an agreed stop."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    # A signal that came during start-up: stop before training (the resumed checkpoint stands).
    if dist.all_reduce_sum([float(stop.requested)], ctx.device)[0] > 0:
        log.warning("stop requested by a signal before the first step; exiting with nothing new to save")
        result.preempted = True
        return
    if cfg.train.eval_only:
        _eval_only(run, result)
        return
    speed = Throughput()
    dp = run.plan.batch.world_size
    while state.step < cfg.train.max_steps:
        micro = run.source.train_micro_batches(state.step)
        every = cfg.logging.grad_norm_every
        out = train_step(run.engine, micro, ctx, run.lr(state.step), run.objective,
                         reference_count=run.source.reference_count, dp_size=dp,
                         votes=(stop.requested, run.callbacks.stop_vote),
                         layer_norms=bool(every) and (state.step + 1) % every == 0)
        stats, (signals, asks) = out.stats, out.votes
        state.record_step(skipped=stats.skipped, tokens=round(out.count))
        speed.add(round(out.count))
        done = state.step
        record = _record(state, out.loss, stats)
        if out.layer_norms:
            record.update(layer_norm_record(out.layer_norms))
        is_last = done == cfg.train.max_steps or done == cfg.train.stop_at
        if done % cfg.train.log_every == 0 or is_last or stats.skipped:
            record.update(speed.report())
            run.mfu.add_to(record)
            if ctx.device_type == "cuda":  # host-side counters: no device sync
                record["max_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                torch.cuda.reset_peak_memory_stats(ctx.device)
            record["eta_s"] = (cfg.train.max_steps - done) * record["step_ms"] / 1000
        val_loss, improved = None, False
        if cfg.train.eval_steps and (is_last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)):
            val_loss, val_metrics = evaluate(run.engine, run.source, run.objective, cfg.train.eval_steps, ctx, dp)
            record["val_loss"] = result.final_val_loss = val_loss
            record.update({f"val_{name}": value for name, value in val_metrics.items()})
            improved = state.record_eval(val_loss)
            if cfg.schedule.kind == "plateau":
                state.record_plateau(val_loss, cfg.schedule, cfg.optim.lr)
        run.callbacks.step_end(run.info, state, record)
        result.last_step = done
        if state.skipped_in_row > cfg.train.max_skipped_steps:
            raise TrainingError(
                f"{state.skipped_in_row} non-finite steps in a row (train.max_skipped_steps="
                f"{cfg.train.max_skipped_steps}) at step {done}; the last good checkpoint is untouched; "
                "lower optim.lr or use precision=bf16"
            )
        if val_loss is not None:
            run.callbacks.eval(run.info, state, val_loss)
            asks = dist.all_reduce_sum([float(run.callbacks.stop_vote)], ctx.device)[0]
        result.preempted, result.stopped = signals > 0, asks > 0 and not signals > 0
        requested = result.preempted or result.stopped
        periodic = bool(cfg.checkpoint.every and done % cfg.checkpoint.every == 0)
        if cfg.checkpoint.policy == "best":  # periodic saves at evaluations that beat the best loss
            periodic = val_loss is not None and improved
        if is_last or requested or periodic:
            saved = run.save(val_loss)
            result.stop_saved = saved or not requested
        if requested:
            log.warning("stop requested by %s: %s step %d", "a signal" if result.preempted else "a callback",
                        "saved" if result.stop_saved else "could NOT save", done)
        if done == cfg.train.stop_at or requested:
            break


def _eval_only(run: _Run, result: RunResult) -> None:
    """Collective. train.eval_only: one evaluation of the loaded weights, logged; nothing trained or saved."""
    cfg, state = run.cfg, run.state
    if state.step == 0 and cfg.model.init_from is None:
        raise ConfigError(f"train.eval_only: no checkpoint in {cfg.run.out_dir}/ckpt and no model.init_from; "
                          "point run.out_dir at a trained run or set model.init_from")
    val_loss, metrics = evaluate(run.engine, run.source, run.objective, cfg.train.eval_steps, run.ctx,
                                 run.plan.batch.world_size)
    result.final_val_loss, result.last_step = val_loss, state.step
    record = {"step": state.step, "val_loss": val_loss, **{f"val_{k}": v for k, v in metrics.items()}, "eval_only": True}
    run.callbacks.step_end(run.info, state, record)
    run.callbacks.eval(run.info, state, val_loss)
    log.info("eval_only: validation loss %.4f at step %d", val_loss, state.step)
