"""The config tree: pydantic models, file loading, `key=value` overrides, validation.

Owns every user-facing setting and its checks. Imports no torch, so `scaletrain config show` and every
validation error come back fast, and all of it runs before a process group exists, identically on
every rank. Imports: `scaletrain.errors` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from scaletrain.errors import ConfigError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

Precision = Literal["bf16", "fp16", "fp32"]


def _not_bool(v: Any) -> Any:
    # `true` is an int to Python; a boolean for a number is a typo, not 1.
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got a boolean ({str(v).lower()})")
    return v


# Integers are strict: no bools, no floats, no strings. The override parser and TOML/JSON/YAML already
# give typed values, so `train.max_steps=3` still works while `train.max_steps=true` is refused.
Int = Annotated[int, Strict()]
# Floats take ints (`optim.lr=1`) but not bools; non-finite values are refused model-wide.
Float = Annotated[float, BeforeValidator(_not_bool)]
# Seeds feed torch.manual_seed (seed + 1000 * step + rank) and a Philox uint64 key.
MAX_SEED = 2**63 - 1


def _callable_spec(v: str | None) -> str | None:
    """A user hook is named "pkg.module:function"; it is imported at plan time, never evaluated."""
    if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
        raise ValueError(f'expected "pkg.module:function", got {v!r}')
    return v


class _Section(BaseModel):
    # allow_inf_nan=False: `inf`/`nan` would pass `gt=0` and overflow later (timeouts, schedules).
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


Section = _Section  # the base of every section, a backend's own (`backend.<kind>`) included


class RunConfig(_Section):
    name: str = Field("scaletrain", description="Run name, shown in logs and trackers.")
    out_dir: Path = Field(Path("runs/default"), description="Run directory: config.json, metrics.jsonl, ckpt/.")
    seed: Int = Field(1337, ge=0, le=MAX_SEED, description="Seeds model init and the data order.")


class ModelConfig(_Section):
    n_layer: Int = Field(4, ge=1, description="Transformer blocks.")
    n_head: Int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: Int = Field(128, ge=1, description="Width of the residual stream.")
    block_size: Int = Field(128, ge=2, description="Sequence length in tokens.")
    vocab_size: Int | None = Field(None, ge=2, description="Defaults to the data's vocab_size.")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(False, description="Biases in linear layers and norms.")
    factory: str | None = Field(None, description='A user model: "pkg.module:function" (see docs/models.md).')
    loss_fn: str | None = Field(
        None, description='"pkg.module:function" called as fn(outputs, batch) -> mean or (sum, count).'
    )
    init_from: Path | None = Field(None, description="Start from a consolidated weights file.")
    compile: bool = Field(False, description="Wrap the model with torch.compile.")

    @field_validator("factory", "loss_fn")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        return _callable_spec(v)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.factory is None and self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self


class DataConfig(_Section):
    path: Path = Field(Path("data/default"), description="Folder with train.bin, val.bin and meta.json.")
    vocab_size: Int | None = Field(
        None, ge=2, description="A nanoGPT folder (train.bin/val.bin, no meta.json): its vocabulary (uint16 ids)."
    )
    factory: str | None = Field(
        None, description='"pkg.module:function" returning (train, val) map-style datasets (docs/data.md).'
    )
    collate: str | None = Field(
        None, description='"pkg.module:function" turning a list of examples into a batch (default: stack/pad).'
    )
    pad_id: Int = Field(0, ge=0, description="Default collate: the id that pads variable-length input_ids.")
    ignore_index: Int = Field(-100, description="Default collate: the label value that pads labels (not counted).")
    num_workers: Int = Field(2, ge=0, description="DataLoader worker processes for data.factory datasets.")

    @field_validator("factory", "collate")
    @classmethod
    def _callable_form(cls, v: str | None) -> str | None:
        return _callable_spec(v)


class TrainConfig(_Section):
    max_steps: Int = Field(200, ge=1, description="Optimizer steps in the whole run.")
    epochs: Int | None = Field(
        None, ge=1, description="data.factory datasets: passes over the training set instead of max_steps."
    )
    micro_batch_size: Int = Field(8, ge=1, description="Sequences per rank per micro-step.")
    grad_accum: Int | None = Field(None, description="Micro-steps per optimizer step (default 1).")
    global_batch_size: Int | None = Field(
        None, ge=1, description="Sequences per optimizer step; derives grad_accum instead."
    )
    grad_clip: Float = Field(1.0, ge=0.0, description="Max global grad norm; 0 turns clipping off.")
    max_skipped_steps: Int = Field(5, ge=0, description="Non-finite steps in a row before the run stops.")
    eval_every: Int = Field(100, ge=0, description="Steps between evaluations; 0 only at the end.")
    eval_steps: Int = Field(8, ge=0, description="Validation batches per evaluation.")
    log_every: Int = Field(10, ge=1, description="Steps between console lines.")
    allow_tf32: bool = Field(
        True, description="On CUDA, fp32 matmuls and convolutions use TF32 tensor cores (nanoGPT's default)."
    )
    eval_only: bool = Field(False, description="Evaluate the resumed or init_from weights, then exit.")
    stop_at: Int | None = Field(
        None, ge=1, description="End this invocation after this step, with a checkpoint; the schedule "
        "still follows max_steps (time-sliced jobs)."
    )

    @field_validator("grad_accum")
    @classmethod
    def _accum_positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 (got {v}); it counts micro-steps per optimizer step")
        return v

    @model_validator(mode="after")
    def _one_batch_spec(self) -> TrainConfig:
        if self.grad_accum is not None and self.global_batch_size is not None:
            raise ValueError("set train.grad_accum or train.global_batch_size, not both")
        if self.epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("set train.max_steps or train.epochs, not both")
        return self


class OptimConfig(_Section):
    lr: Float = Field(1e-3, description="Peak learning rate.")
    weight_decay: Float = Field(0.1, ge=0.0, description="Applied to matrices only (see docs).")
    betas: tuple[Float, Float] = (0.9, 0.95)
    eps: Float = Field(1e-8, gt=0.0)

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1) (got {list(v)})")
        return v


class ScheduleConfig(_Section):
    kind: Literal["cosine", "linear", "constant", "wsd", "step", "onecycle", "plateau"] = "cosine"
    warmup_steps: Int = Field(20, ge=0)
    min_lr: Float = Field(1e-4, ge=0.0, description="Floor the decay ends at (absolute, not a ratio).")
    decay_fraction: Float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps spent decaying.")
    gamma: Float = Field(0.1, gt=0.0, le=1.0, description="step: factor applied every step_size steps.")
    step_size: Int = Field(100, ge=1, description="step: steps between decays.")
    pct_start: Float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: share of steps spent rising.")
    div_factor: Float = Field(25.0, ge=1.0, description="onecycle: peak / starting lr.")
    final_div_factor: Float = Field(1e4, ge=1.0, description="onecycle: starting lr / final lr.")
    factor: Float = Field(0.1, gt=0.0, lt=1.0, description="plateau: factor applied when validation loss stalls.")
    patience: Int = Field(2, ge=0, description="plateau: evaluations without improvement before a cut.")
    threshold: Float = Field(1e-4, ge=0.0, description="plateau: relative improvement that counts.")
    cooldown: Int = Field(0, ge=0, description="plateau: evaluations to wait after a cut.")


class BackendConfig(_Section):
    """What every backend shares. Each registered backend adds its own section, `backend.<kind>`,
    and its name to the values `kind` takes (`add_backend`, called by `scaletrain.engines.registry`)."""

    kind: str = Field("ddp", description="Which registered backend runs: ddp, fsdp, deepspeed, or one you register.")
    tp_size: Int = Field(
        1, ge=1, description="Tensor-parallel ranks per model replica (torch-native backends); the "
        "data-parallel size is world size / tp_size."
    )
    timeout_s: Float = Field(
        600.0, gt=0, le=30 * 86400, description="Collective timeout: a hung rank fails the job after it."
    )


# The backends' own sections, in registration order: kind -> its section model (None: no section).
# The schema names no backend; the backend registry fills this table, and each change rebuilds
# BackendConfig (and Config, which embeds it) in place, so the classes keep their identity: configs
# already made, pickles, `valid_keys` and `config show` all see one schema.
_BACKENDS: dict[str, type[_Section] | None] = {}
_SHARED_FIELDS = dict(BackendConfig.model_fields)


def backend_kinds() -> tuple[str, ...]:
    """The registered backend kinds, in registration order."""
    return tuple(_BACKENDS)


def add_backend(kind: str, section: type[_Section] | None) -> None:
    """Let `backend.kind` take `kind`, and give it the section `backend.<kind>` (defaults filled)."""
    if kind in _SHARED_FIELDS or not kind.isidentifier():
        raise ValueError(f"backend kind {kind!r}: must be an identifier other than {sorted(_SHARED_FIELDS)}")
    _BACKENDS[kind] = section
    _rebuild_backend_schema()


def remove_backend(kind: str) -> None:
    _BACKENDS.pop(kind, None)
    _rebuild_backend_schema()


def _rebuild_backend_schema() -> None:
    fields = dict(_SHARED_FIELDS)
    kinds = tuple(_BACKENDS)
    kind = _SHARED_FIELDS["kind"]
    fields["kind"] = FieldInfo.from_annotated_attribute(
        Literal[kinds] if kinds else str, Field(kind.default, description=kind.description))  # type: ignore[valid-type]
    for name, section in _BACKENDS.items():
        if section is not None:
            fields[name] = FieldInfo.from_annotated_attribute(section, section())
    _set_fields(BackendConfig, fields)
    backend = FieldInfo.from_annotated_attribute(BackendConfig, BackendConfig())
    _set_fields(Config, {**Config.model_fields, "backend": backend})


def _set_fields(model: type[BaseModel], fields: dict[str, FieldInfo]) -> None:
    # pydantic >= 2.10 keeps a model's fields in __pydantic_fields__ (model_fields reads it); older
    # releases in model_fields itself. A forced rebuild makes the validator and serializer anew.
    if "__pydantic_fields__" in vars(model):
        model.__pydantic_fields__ = fields
    else:  # pragma: no cover
        model.model_fields = fields  # type: ignore[misc]
    model.model_rebuild(force=True)


class CheckpointConfig(_Section):
    every: Int = Field(100, ge=0, description="Steps between checkpoints; 0 only at the end.")
    keep_last: Int = Field(3, ge=1, description="Complete tags kept by rotation (the best tag is kept apart).")
    format: Literal["sharded", "full"] = Field("sharded", description="Per-rank shards, or one full file.")
    resume: str = Field("auto", description='"auto" (from ckpt/latest), "never", or a tag directory.')
    async_save: bool = Field(False, alias="async", description="Write in the background where the backend can.")
    on_error: Literal["fail", "warn"] = Field("fail", description="A failed save stops the run, or warns.")
    keep_best: bool = Field(True, description="Keep the tag with the lowest validation loss apart from rotation.")
    policy: Literal["every", "best"] = Field(
        "every", description='"best": periodic saves only when validation loss improves (stops and the end still save).'
    )

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, validate_default=True, allow_inf_nan=False
    )


class EvalConfig(_Section):
    metrics_fn: str | None = Field(
        None, description='"pkg.module:function" returning {name: (sum, count)} per validation batch.'
    )

    @field_validator("metrics_fn")
    @classmethod
    def _callable_form(cls, v: str | None) -> str | None:
        return _callable_spec(v)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    console: bool = Field(True, description="Rich progress and step lines on rank 0.")
    trackers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ()
    plot: bool = Field(False, description="Write curves.png into the run folder at the end (needs matplotlib).")
    peak_tflops: Float | None = Field(
        None, gt=0.0, description="Device peak TFLOP/s for MFU (default: a table of common GPUs; none on CPU)."
    )
    grad_norm_every: Int = Field(0, ge=0, description="Log per-layer gradient norms every K steps (0: off).")


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Precision = "fp32"
    backend: BackendConfig = BackendConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        schedule = fit_schedule(self.schedule, max_steps=self.train.max_steps, lr=self.optim.lr)
        if schedule is not self.schedule:  # frozen: the validated tree takes the fitted section
            object.__setattr__(self, "schedule", schedule)
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# Schedules whose decay ends at schedule.min_lr (the others never read it).
MIN_LR_KINDS = ("cosine", "linear", "wsd", "plateau")


def fit_schedule(schedule: ScheduleConfig, *, max_steps: int, lr: float) -> ScheduleConfig:
    """The schedule section fitted to the run: a default the user did not set never fails a run.

    An unset `warmup_steps` longer than the run shortens to the run's length, and an unset `min_lr`
    above `optim.lr` comes down to it; the same values set by hand are errors naming both keys.
    `min_lr` is checked only for the schedules that decay to it."""
    given = schedule.model_fields_set
    update: dict[str, Any] = {}
    if schedule.warmup_steps > max_steps:
        if "warmup_steps" in given:
            raise ValueError(f"schedule.warmup_steps ({schedule.warmup_steps}) exceeds train.max_steps ({max_steps}); "
                             "lower schedule.warmup_steps")
        update["warmup_steps"] = max_steps
    if schedule.kind in MIN_LR_KINDS and schedule.min_lr > lr:
        if "min_lr" in given:
            raise ValueError(f"schedule.min_lr ({schedule.min_lr}) exceeds optim.lr ({lr}); lower schedule.min_lr")
        update["min_lr"] = lr
    return schedule.model_copy(update=update) if update else schedule


def resolve_grad_accum(train: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step: train.grad_accum, or derived from train.global_batch_size.

    Torch-free so `ds_config` and `loop.resolve_batch` share one arithmetic; a global batch that does
    not divide fails."""
    if train.global_batch_size is None:
        return train.grad_accum or 1
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) is not a multiple of "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}"
        )
    return train.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------
# Loading and overrides
