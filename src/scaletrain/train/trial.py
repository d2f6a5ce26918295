"""Inside a sweep trial: the callback that reports each validation loss to the trial's Optuna storage and
votes to stop when the pruner says so (or the loss is not finite). The sweep names the trial through
`SCALETRAIN_SWEEP_*` environment variables; the loop adds the callback when they are set.
Imports: optuna (lazily), `scaletrain.train.callbacks`, `scaletrain.errors`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from scaletrain.errors import ConfigError
from scaletrain.train.callbacks import Callback, RunInfo

ENV_TRIAL = "SCALETRAIN_SWEEP_TRIAL"  # the trial's id in the storage


ENV_STORAGE = "SCALETRAIN_SWEEP_STORAGE"


ENV_STUDY = "SCALETRAIN_SWEEP_STUDY"


ENV_PRUNER = "SCALETRAIN_SWEEP_PRUNER"  # "median:<startup trials>:<warmup steps>" or "none"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("sweep: optuna is not installed; pip install 'scaletrain[sweep]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats are driven by hand here (the sweep waits on a subprocess, not on Study.optimize).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def make_pruner(spec: str) -> Any:
    optuna = _optuna()
    if spec == "none":
        return optuna.pruners.NopPruner()
    _, startup, warmup = spec.split(":")
    return optuna.pruners.MedianPruner(n_startup_trials=int(startup), n_warmup_steps=int(warmup))


class TrialCallback(Callback):
    """Reports each validation loss to the trial and votes to stop when the pruner says so, or when
    the loss is not finite. Only rank 0 touches the storage; the loop agrees on the vote."""

    def __init__(self, storage_url: str, study_name: str, trial_id: int, pruner: str) -> None:
        self.storage_url, self.study_name, self.trial_id, self.pruner = storage_url, study_name, trial_id, pruner
        self._trial: Any = None

    def _get(self) -> Any:
        if self._trial is None:
            optuna = _optuna()
            study = optuna.load_study(study_name=self.study_name, storage=self.storage_url,
                                      pruner=make_pruner(self.pruner))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_eval(self, run: RunInfo, state: Any, val_loss: float) -> bool | None:
        if not run.is_main:
            return None
        trial = self._get()
        if not math.isfinite(val_loss):
            trial.set_user_attr("fail_reason", f"non-finite validation loss ({val_loss}) at step {state.step}")
            return True
        trial.report(val_loss, state.step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", state.step)
            return True
        return None


def trial_callback_from_env() -> TrialCallback:
    try:
        return TrialCallback(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]),
                             os.environ.get(ENV_PRUNER, "none"))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{ENV_TRIAL} is set but the sweep's other variables are missing or bad ({e}); "
                          "start trials through `scaletrain sweep`") from None
