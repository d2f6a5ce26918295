"""The config tree: the schema (`config.schema`) and how a config is read (`config.load`).

Both halves are re-exported here, so `from scaletrain.config import Config, load_config` is the one
spelling callers use. The backends' own sections (`backend.fsdp`, ...) live with their backends
(`scaletrain.engines.backends`), which register them into the schema (`schema.add_backend`).
Imports no torch. Imports: `scaletrain.config.schema`, `scaletrain.config.load`.
"""

from scaletrain.config.load import (
    build_config,
    config_to_toml,
    load_config,
    parse_overrides,
    parse_value,
    read_config_file,
    valid_keys,
)
from scaletrain.config.schema import (
    MAX_SEED,
    BackendConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    fit_schedule,
    resolve_grad_accum,
)

__all__ = [
    "MAX_SEED", "BackendConfig", "CheckpointConfig", "Config", "DataConfig",
    "EvalConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "Precision",
    "RunConfig", "ScheduleConfig", "TrainConfig", "build_config", "config_to_toml", "fit_schedule", "load_config",
    "parse_overrides", "parse_value", "read_config_file", "resolve_grad_accum", "valid_keys",
]
