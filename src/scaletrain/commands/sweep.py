"""`scaletrain sweep --space SPACE --trials N`: an Optuna study of whole training runs.
Imports: `scaletrain.errors`, `scaletrain.experiments.sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scaletrain.errors import ConfigError
from scaletrain.experiments.sweep import run_sweep


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="hyperparameter search with Optuna (pip install 'scaletrain[sweep]')")
    p.add_argument("--config", type=Path, help="base TOML/JSON/YAML config")
    p.add_argument("--space", type=Path, required=True, help="search space TOML: one table per dotted key")
    p.add_argument("--trials", type=int, required=True, help="finished trials the study should hold in all")
    p.add_argument("--study", help="study name (default: the config file's name)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the output folder)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/sweep-<study>)")
    p.add_argument("--nproc", type=int, default=1, help="processes per trial (torchrun when > 1)")
    p.add_argument("--backend", help="backend spec for every trial: ddp, fsdp[:strategy], tp:N, deepspeed[:stage][+offload]")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--pruner", choices=("median", "none"), default="median")
    p.add_argument("--pruner-startup-trials", type=int, default=1, help="trials completed before pruning starts")
    p.add_argument("--pruner-warmup-steps", type=int, default=0, help="steps of a trial before it can be pruned")
    p.add_argument("--heartbeat-interval", type=int, default=5, help="seconds between a trial's heartbeats")
    p.add_argument("--grace-period", type=int, default=20,
                   help="seconds without a heartbeat after which a running trial counts as lost")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every trial")

    def run(args: argparse.Namespace) -> int:
        for name in ("trials", "nproc", "heartbeat_interval", "grace_period"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        return run_sweep(args)

    p.set_defaults(func=run)
