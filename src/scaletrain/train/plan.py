"""The run plan: everything checked before a process group exists, identically on every rank.

`plan_run` reads the data (a token folder's meta, or the datasets of `data.factory`), works out the
batch arithmetic and the backend's own rules through the registry, checks the run folder, and imports
every user function the config names once (`model.factory`, `model.loss_fn`, `eval.metrics_fn`,
`data.collate`): a bad name fails here, on every rank alike, before anything is built. The backend's
spec (the name meta.json records) is resolved here once and kept for the whole run.
Imports: `scaletrain.config`, `scaletrain.data` (`format`, `sources`, `tokens`), `scaletrain.engines.registry`,
`scaletrain.errors`, `scaletrain.hooks`, `scaletrain.model.materialize` (the `model.init_from` check),
`scaletrain.train.lease`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scaletrain.config import Config, TrainConfig, fit_schedule, resolve_grad_accum
from scaletrain.data.format import DataMeta, read_meta
from scaletrain.data.tokens import BatchPlan
from scaletrain.engines import registry
from scaletrain.errors import ConfigError
from scaletrain.hooks import import_callable
from scaletrain.train.lease import check_free

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserHooks:
    """The user functions a config names, imported once (None where the config names none)."""

    model_factory: Callable[..., Any] | None = None
    loss_fn: Callable[..., Any] | None = None
    metrics_fn: Callable[..., Any] | None = None
    collate: Callable[..., Any] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> UserHooks:
        named = {"model_factory": (cfg.model.factory, "model.factory"), "loss_fn": (cfg.model.loss_fn, "model.loss_fn"),
                 "metrics_fn": (cfg.eval.metrics_fn, "eval.metrics_fn"), "collate": (cfg.data.collate, "data.collate")}
        return cls(**{field: import_callable(spec, key) for field, (spec, key) in named.items() if spec})


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # with train.max_steps resolved from train.epochs where that was given
    data_meta: DataMeta | None  # token folders; None for data.factory datasets
    batch: BatchPlan  # world_size here is the data-parallel size
    vocab_size: int | None
    spec: str  # the backend spec meta.json records, e.g. "fsdp:full_shard" (resolved once)
    hooks: UserHooks = UserHooks()
    datasets: tuple[Any, Any] | None = None  # (train, val) from data.factory


def resolve_batch(train: TrainConfig, dp_size: int) -> BatchPlan:
    """grad_accum from train.global_batch_size when given; a global batch that does not divide fails."""
    return BatchPlan(train.micro_batch_size, resolve_grad_accum(train, dp_size), dp_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """Everything checked before any process group exists. Raises ScaletrainError subclasses."""
    hooks = UserHooks.from_config(cfg)
    if cfg.data.factory:
        return _plan_datasets(cfg, world_size, hooks)
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
    return RunPlan(cfg, meta, batch, vocab, registry.spec_of(cfg), hooks)


def _plan_datasets(cfg: Config, world_size: int, hooks: UserHooks) -> RunPlan:
    """data.factory: the datasets are built here (every rank, before any process group) and checked."""
    from scaletrain.data.sources import load_datasets

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
        cfg = _with_epochs(cfg, cfg.train.epochs * per_epoch)
    log.info("data.factory: %d training examples, %d steps per epoch of global batch %d (last partial batch "
             "dropped); %d steps", len(train_ds), per_epoch, batch.global_batch_size, cfg.train.max_steps)
    _check_run_dir(cfg)
    return RunPlan(cfg, None, batch, cfg.model.vocab_size, registry.spec_of(cfg), hooks, datasets=(train_ds, val_ds))


def _with_epochs(cfg: Config, steps: int) -> Config:
    """train.epochs as steps; the schedule is fitted to them as a config's own max_steps would be."""
    try:
        schedule = fit_schedule(cfg.schedule, max_steps=steps, lr=cfg.optim.lr)
    except ValueError as e:
        raise ConfigError(f"{e} (the {steps} steps of train.epochs={cfg.train.epochs})") from None
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps}), "schedule": schedule})


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
