"""The shared training loop: one loop for every backend. Train, evaluate, log, checkpoint, resume, stop.

`plan_run` checks everything that can be checked before a process group exists (data, batch
arithmetic, the run directory), identically on every rank. `train` then builds the engine and runs.
The loop never asks which backend it has. Rank-0-only work is limited to the metrics sink and the
checkpoint manifest; evaluation runs on every rank (a rank-0-only forward hangs FSDP and ZeRO-3).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaletrain import data as data_mod
from scaletrain import dist
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config import Config, TrainConfig, resolve_grad_accum
from scaletrain.engines import Engine, EngineSpec, build_engine
from scaletrain.errors import ConfigError, TrainingError
from scaletrain.metrics import Throughput, make_sink
from scaletrain.model import build_model, count_params
from scaletrain.optim import build_adamw, lr_at

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again (or requeue) to resume


@dataclass(frozen=True)
class RunPlan:
    cfg: Config
    data_meta: data_mod.DataMeta
    batch: data_mod.BatchPlan
    vocab_size: int


@dataclass
class RunResult:
    last_step: int
    preempted: bool = False
    final_val_loss: float | None = None
    losses: list[float] = field(default_factory=list)


def resolve_batch(train: TrainConfig, world_size: int) -> data_mod.BatchPlan:
    """grad_accum from train.global_batch_size when given; a global batch that does not divide fails."""
    return data_mod.BatchPlan(train.micro_batch_size, resolve_grad_accum(train, world_size), world_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """Everything checked before any process group exists. Raises ScaletrainError subclasses."""
    meta = data_mod.read_meta(cfg.data.path)
    for split, n in (("train", meta.train_tokens), ("val", meta.val_tokens)):
        if n <= cfg.model.block_size:
            raise ConfigError(
                f"model.block_size ({cfg.model.block_size}) needs more than the {n} tokens of "
                f"{cfg.data.path}/{split}.bin; lower model.block_size or prepare more text"
            )
    vocab = cfg.model.vocab_size or meta.vocab_size
    if vocab < meta.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the data's vocab_size ({meta.vocab_size})")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is not a file; give a consolidated weights file")
    batch = resolve_batch(cfg.train, world_size)
    _check_run_dir(cfg)
    if cfg.backend.kind == "deepspeed":  # its JSON's "auto" values and conflicts, before any process group
        from scaletrain.ds_config import resolve_ds_config

        resolve_ds_config(cfg, world_size=world_size)
    return RunPlan(cfg, meta, batch, vocab)


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


class _StopRequest:
    """SIGUSR1 (SLURM's warning before preemption) and SIGTERM: finish the step, save, exit 75."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True  # a second signal during the save changes nothing

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            # After a stop the process is on its way out with exit 75 and a committed checkpoint. The
            # launcher may SIGTERM the slower ranks once a faster one has exited (srun
            # --kill-on-bad-exit, torchrun); that must not turn a clean stop into a crash.
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def make_engine(plan: RunPlan, ctx: dist.DistContext) -> Engine:
    cfg = plan.cfg
    init_state = None
    if cfg.model.init_from is not None:
        from scaletrain.checkpoint.weights import load_weights_file

        init_state = lambda: load_weights_file(Path(cfg.model.init_from))  # noqa: E731
    spec = EngineSpec(
        ctx=ctx,
        precision=cfg.precision,
        grad_accum=plan.batch.grad_accum,
        grad_clip=cfg.train.grad_clip,
        micro_batch_size=cfg.train.micro_batch_size,
        model_factory=lambda: build_model(cfg.model, plan.vocab_size),
        optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type=ctx.device_type),
        lr_fn=lambda n: lr_at(n, peak=cfg.optim.lr, cfg=cfg.schedule, max_steps=cfg.train.max_steps),
        compile=cfg.model.compile,
        checkpoint_format=cfg.checkpoint.format,
        init_state=init_state,
    )
    torch.manual_seed(cfg.run.seed)  # identical init on every rank: sharded engines rely on it
    return build_engine(spec, cfg)


def evaluate(engine: Engine, batches: data_mod.Batches, num_batches: int, ctx: dist.DistContext) -> float:
    """Collective. Validation loss averaged over all ranks' tokens."""
    engine.train(False)
    loss_sum, tokens = 0.0, 0
    for i in range(num_batches):
        x, y = batches.val_batch(i)
        loss_sum += float(engine.eval_loss((x, y))) * y.numel()
        tokens += y.numel()
    engine.train(True)
    total, count = dist.all_reduce_sum([loss_sum, tokens], ctx.device)
    return total / max(count, 1)


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop records of steps past the checkpoint: they will be run and logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def train_step(engine: Engine, micro: list, ctx: dist.DistContext, stop_requested: bool = False):
    """Collective. One optimizer step over this rank's micro-batches.

    Returns (global mean loss, StepStats, number of ranks asked to stop). One collective besides the
    engine's own: the loss and the stop votes travel together.
    """
    loss_sum = torch.zeros((), device=ctx.device)
    for m, mb in enumerate(micro):
        with engine.accumulate(is_boundary=m == len(micro) - 1):
            loss = engine.forward(mb)
            engine.backward(loss)
        loss_sum += loss.detach().float()
    total, stop_votes = dist.all_reduce_sum([float(loss_sum) / len(micro), float(stop_requested)], ctx.device)
    loss_value = total / ctx.world_size
    stats = engine.step(force_skip=not math.isfinite(loss_value))
    return loss_value, stats, stop_votes


def train(plan: RunPlan, ctx: dist.DistContext) -> RunResult:
    """Collective. The whole run on an initialised process group."""
    cfg, batch = plan.cfg, plan.batch
    run_dir = cfg.run.out_dir
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    dist.barrier()
    engine = make_engine(plan, ctx)
    ckpt = CheckpointManager(run_dir / "ckpt", cfg.checkpoint, ctx)
    state = ckpt.resume(engine) or {}
    start = int(state.get("step", 0))
    if ctx.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    rngs = state.get("rng") or []
    if len(rngs) == ctx.world_size:
        _set_rng_state(rngs[ctx.rank])
    elif state:
        torch.manual_seed(cfg.run.seed + 1000 * start + ctx.rank)  # world size changed: fresh, deterministic
    batches = data_mod.Batches(cfg.data.path, plan.data_meta, block_size=cfg.model.block_size, plan=batch,
                               rank=ctx.rank, seed=cfg.run.seed)
    sink = make_sink(ctx.is_main, run_dir, cfg.logging, cfg.to_json_dict())
    log.info(
        "%s | %s params | global batch %d = micro %d x accum %d x world %d | %d tokens/step | steps %d..%d",
        engine.name, f"{count_params(engine.module):,}", batch.global_batch_size, batch.micro_batch_size,
        batch.grad_accum, batch.world_size, batch.global_batch_size * cfg.model.block_size, start + 1,
        cfg.train.max_steps,
    )
    stop = _StopRequest()
    stop.install()
    result = RunResult(last_step=start)
    tokens_per_step = batch.global_batch_size * cfg.model.block_size
    skipped_in_row = int(state.get("skipped_in_row", 0))
    skipped_total = int(state.get("skipped_total", 0))
    val_loss: float | None = None
    speed = Throughput()
    sink.start(cfg.train.max_steps, start)
    try:
        for step in range(start, cfg.train.max_steps):
            loss_value, stats, stop_votes = train_step(engine, batches.train_micro_batches(step), ctx, stop.requested)
            done = step + 1
            skipped_in_row = skipped_in_row + 1 if stats.skipped else 0
            speed.add(tokens_per_step)
            record: dict[str, Any] = {"step": done, "loss": loss_value, "lr": stats.lr, "grad_norm": stats.grad_norm,
                                      "tokens": done * tokens_per_step}
            if stats.skipped:
                skipped_total += 1
                record.update(skipped=True, skipped_total=skipped_total)
            if stats.loss_scale is not None:
                record["loss_scale"] = stats.loss_scale
            is_last = done == cfg.train.max_steps or done == cfg.train.stop_at
            if done % cfg.train.log_every == 0 or is_last or stats.skipped:
                record.update(speed.report())
                record["eta_s"] = (cfg.train.max_steps - done) * record["step_ms"] / 1000
            val_loss = None
            if cfg.train.eval_steps and (is_last or (cfg.train.eval_every and done % cfg.train.eval_every == 0)):
                val_loss = evaluate(engine, batches, cfg.train.eval_steps, ctx)
                record["val_loss"] = val_loss
                result.final_val_loss = val_loss
            sink.log(record, console=done % cfg.train.log_every == 0 or is_last or "val_loss" in record)
            result.losses.append(loss_value)
            result.last_step = done
            if skipped_in_row > cfg.train.max_skipped_steps:
                raise TrainingError(
                    f"{skipped_in_row} non-finite steps in a row (train.max_skipped_steps="
                    f"{cfg.train.max_skipped_steps}) at step {done}; the last good checkpoint is untouched; "
                    "lower optim.lr or use precision=bf16"
                )
            preempt = stop_votes > 0
            if is_last or preempt or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                _save(ckpt, engine, ctx, plan, done, val_loss,
                      {"skipped_in_row": skipped_in_row, "skipped_total": skipped_total})
            if done == cfg.train.stop_at:
                break
            if preempt:
                log.warning("stop requested by a signal: saved step %d, exiting with code %d", done, EXIT_PREEMPTED)
                result.preempted = True
                break
        ckpt.finish_pending()
    finally:
        stop.restore()
        sink.close()
        engine.close()
    return result


def _save(ckpt: CheckpointManager, engine: Engine, ctx: dist.DistContext, plan: RunPlan, step: int,
          val_loss: float | None, counters: dict[str, int]) -> None:
    """Collective. Gather every rank's RNG into the client state and save one tag."""
    cfg = plan.cfg
    client_state = {"step": step, **counters, "rng": dist.all_gather_object(_rng_state()),
                    "tokens": step * plan.batch.global_batch_size * cfg.model.block_size}
    meta = {
        "backend": cfg.backend.kind, "world_size": ctx.world_size, "precision": cfg.precision,
        "format": cfg.checkpoint.format if cfg.backend.kind != "deepspeed" else "deepspeed",
        "tokens": client_state["tokens"], "val_loss": val_loss, "config": cfg.to_json_dict(),
        "model": {"factory": cfg.model.factory, "vocab_size": plan.vocab_size},
    }
    ckpt.save(engine, step, client_state, meta)
