"""The run object: one training run's engine, data, objective, checkpoint manager, state and callbacks,
built once from a `RunPlan` on an initialised process group, with the verbs a loop is made of.

The built-in loop (`train.loop`) is a sequence of phases over one `Run`; a loop of a user's own is meant
to drive the same object. Building it is collective: the engine wraps the model, and the newest intact
checkpoint is resumed (counters, RNG of every rank, engine state).
Imports: torch, `scaletrain.checkpoint.manager`, `scaletrain.data` (`sources`, `tokens`), `scaletrain.dist`,
`scaletrain.engines` (`base`, `registry`), `scaletrain.hostmem`, `scaletrain.model.build`, `scaletrain.objective`, `scaletrain.optim`,
`scaletrain.train` (`cadence`, `callbacks`, `flops`, `metrics`, `plan`, `state`, `step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from scaletrain import dist
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.data.sources import TokenSource
from scaletrain.data.tokens import Batches
from scaletrain.engines import registry
from scaletrain.engines.base import Engine, EngineSpec
from scaletrain.hostmem import returning_freed_memory
from scaletrain.model.build import build_model
from scaletrain.objective import Objective, is_causal_lm
from scaletrain.optim import build_adamw, lr_at
from scaletrain.train.cadence import EvalCadence, StepLog
from scaletrain.train.callbacks import Callback, CallbackList, RunInfo, SinkCallback
from scaletrain.train.flops import MFUMeter
from scaletrain.train.metrics import SummaryCallback, make_sink, truncate_metrics
from scaletrain.train.plan import RunPlan
from scaletrain.train.state import TrainState, rng_state, set_rng_state
from scaletrain.train.step import StepOutcome, evaluate, train_step


def make_engine(plan: RunPlan, ctx: dist.DistContext) -> Engine:
    """Collective. The configured backend's engine over the configured model and optimizer."""
    cfg = plan.cfg
    spec = EngineSpec(
        ctx=ctx, precision=cfg.precision, grad_accum=plan.batch.grad_accum, grad_clip=cfg.train.grad_clip,
        micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
        model_factory=lambda: build_model(cfg.model, plan.vocab_size, plan.hooks.model_factory),
        optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type=ctx.device_type),
        compile=cfg.model.compile, checkpoint_format=cfg.checkpoint.format, init_from=cfg.model.init_from,
        allow_tf32=cfg.train.allow_tf32,
    )
    with returning_freed_memory():  # building and sharding: freed memory goes back at once
        engine = registry.build_engine(spec, cfg)
    # The RNG stream for dropout starts here, the same on every backend (building on meta or under
    # zero.Init draws nothing from it).
    torch.manual_seed(cfg.run.seed)
    return engine


def make_objective(plan: RunPlan, module: torch.nn.Module) -> Objective:
    return Objective(loss_fn=plan.hooks.loss_fn, metrics_fn=plan.hooks.metrics_fn,
                     ignore_index=plan.cfg.data.ignore_index, causal_lm=is_causal_lm(module))


def make_source(plan: RunPlan, ctx: dist.DistContext) -> Any:
    cfg = plan.cfg
    rank = registry.data_parallel_rank(cfg, ctx.rank)
    if plan.datasets is not None:
        from scaletrain.data.sources import DatasetSource

        train_ds, val_ds = plan.datasets
        return DatasetSource(train_ds, val_ds, plan=plan.batch, rank=rank, seed=cfg.run.seed,
                             max_steps=cfg.train.max_steps, collate=cfg.data.collate, pad_id=cfg.data.pad_id,
                             ignore_index=cfg.data.ignore_index, num_workers=cfg.data.num_workers,
                             pin_memory=ctx.device_type == "cuda", collate_fn=plan.hooks.collate)
    batches = Batches(cfg.data.path, plan.data_meta, block_size=cfg.model.block_size,
                      plan=plan.batch, rank=rank, seed=cfg.run.seed)
    return TokenSource(batches, cfg.model.block_size)


class Run:
    """One training run on an initialised process group. Building it is collective (engine, resume)."""

    def __init__(self, plan: RunPlan, ctx: dist.DistContext, callbacks: Sequence[Callback] = ()) -> None:
        cfg = plan.cfg
        self.plan, self.cfg, self.ctx = plan, cfg, ctx
        self.dp_size = plan.batch.world_size
        self.info = RunInfo(cfg.run.out_dir, ctx.rank, ctx.world_size, cfg.train.max_steps, cfg.to_json_dict())
        self.engine = make_engine(plan, ctx)
        self.objective = make_objective(plan, self.engine.module)
        self.ckpt = CheckpointManager(cfg.run.out_dir / "ckpt", cfg.checkpoint, ctx)
        self.state = self._resume()
        # After resume: truncating metrics.jsonl replaces the file, so the sink opens the new one.
        sink = make_sink(ctx.is_main, cfg.run.out_dir, cfg.logging, self.info.config)
        self.callbacks = CallbackList([SinkCallback(sink), SummaryCallback(), *callbacks])
        mfu = MFUMeter.for_run(self.engine.module, cfg.model.block_size, ctx.device, cfg.precision,
                               allow_tf32=cfg.train.allow_tf32, override=cfg.logging.peak_tflops,
                               world_size=ctx.world_size)
        self.log = StepLog(cfg.train, mfu, ctx.device)
        self.evals = EvalCadence(cfg.train)
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

    def is_last(self, step: int) -> bool:
        """The last step of this invocation: the run's end, or `train.stop_at`."""
        return step in (self.cfg.train.max_steps, self.cfg.train.stop_at)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, peak=cfg.optim.lr, cfg=cfg.schedule, max_steps=cfg.train.max_steps,
                     plateau_scale=self.state.plateau_scale)

    def step(self, votes: Sequence[bool] = ()) -> StepOutcome:
        """Collective. One optimizer step on the next global batch; the state counts it."""
        every = self.cfg.logging.grad_norm_every
        out = train_step(self.engine, self.source.train_micro_batches(self.state.step), self.ctx,
                         self.lr(self.state.step), self.objective, reference_count=self.source.reference_count,
                         dp_size=self.dp_size, votes=votes,
                         layer_norms=bool(every) and (self.state.step + 1) % every == 0)
        self.state.record_step(skipped=out.stats.skipped, tokens=round(out.count))
        return out

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Collective. Validation loss and metrics over `train.eval_steps` batches."""
        return evaluate(self.engine, self.source.eval_batches(self.evals.num_batches), self.objective,
                        self.ctx, self.dp_size)

    def save(self, val_loss: float | None) -> bool:
        """Collective. Gather every rank's RNG into the client state and save one tag."""
        cfg, state = self.cfg, self.state
        client_state = state.client_state(dist.all_gather_object(rng_state()))
        meta = {
            "backend": cfg.backend.kind, "backend_spec": self.plan.spec, "world_size": self.ctx.world_size,
            "precision": cfg.precision, "format": self.engine.checkpoint_format, "tokens": state.tokens,
            "val_loss": val_loss, "config": self.info.config,
            "model": {"factory": cfg.model.factory, "vocab_size": self.plan.vocab_size},
        }
        ok = self.ckpt.save(self.engine, state.step, client_state, meta)
        if ok:
            self.callbacks.save(self.info, state, self.ckpt.dir / f"step_{state.step:08d}")
        return ok

    def close(self) -> None:
        """Local. Stop the data workers and the engine's background work."""
        self.source.close()
        self.engine.close()
