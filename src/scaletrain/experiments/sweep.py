"""`scaletrain sweep`: hyperparameter search with Optuna, one full training run per trial.

The sweep process owns the study (SQLite at `<out>/study.db`, or `--storage URL`) and asks it for
trials one after another. Each trial is a complete `scaletrain train` run in `<out>/trial-<number>`,
started with `--nproc` processes in a session of its own. The trial's rank 0 reports the validation
loss of every evaluation to its Optuna trial (the storage URL and trial id travel in `SCALETRAIN_SWEEP_*`
environment variables; the loop adds `TrialCallback` when they are set) and turns the pruner's verdict
into a stop vote, which the loop agrees on over all ranks; the stop saves a checkpoint, and the sweep
marks the trial PRUNED. A non-finite loss, or a run that fails, marks it FAIL with the reason in the
trial's `fail_reason` user attribute.

`--trials` is the study's total of finished trials (complete, pruned, or failed by the run itself),
so the same command run again continues the study. The sweep keeps a heartbeat for its running trial;
if the sweep is killed its trial processes die with it (each trial's first process gets SIGKILL when
the sweep dies, and torchrun's workers exit when their launcher is gone), and on the next start the
trial whose heartbeat stopped is marked FAIL and another takes its place.

space.toml holds one table per dotted config key:
    ["optim.lr"]            type = "float", low = 1e-4, high = 1e-1, log = true
    ["train.micro_batch_size"] type = "int", low = 2, high = 8  (optional step, log)
    ["schedule.kind"]       type = "categorical", choices = ["cosine", "wsd"]
Imports: optuna (lazily), `scaletrain.config`, `scaletrain.procs`, `scaletrain.train.trial`, `scaletrain.engines.registry` (--backend), `scaletrain.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletrain.config import Config, config_to_toml, load_config, read_config_file, valid_keys
from scaletrain.errors import ConfigError
from scaletrain.procs import Interrupted, interrupt_scope, kill_group, start_child
from scaletrain.train.trial import ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, _optuna, make_pruner

PARAM_TYPES = ("float", "int", "categorical")


# ---------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def bounds(self) -> list[Any]:
        """The values that must each make a valid config."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def load_space(path: Path) -> dict[str, Param]:
    """Read and check space.toml; every error is one line naming the file and the key."""
    data = read_config_file(Path(path))
    if not data:
        raise ConfigError(f"{path}: the search space is empty; add a table such as [\"optim.lr\"]")
    leaves = set(valid_keys())
    sections = {k.rsplit(".", 1)[0] for k in leaves if "." in k}
    space = {}
    for key, spec in data.items():
        where = f"{path}: [\"{key}\"]"
        if key not in leaves or key in sections:
            raise ConfigError(f"{where}: not a config key; use a dotted key such as \"optim.lr\" "
                              "(see `scaletrain config show`)")
        if not isinstance(spec, dict):
            raise ConfigError(f'{where}: expected a table, e.g. ["{key}"] with type = "float", low = ..., high = ...')
        kind = spec.get("type")
        allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
                   "categorical": {"type", "choices"}}
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}: type must be one of {list(PARAM_TYPES)} (got {kind!r})")
        extra = sorted(set(spec) - allowed[kind])
        if extra:
            raise ConfigError(f"{where}: unknown field {extra[0]!r} for type {kind!r}; allowed: {sorted(allowed[kind])}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            if not all(isinstance(c, (str, int, float, bool)) for c in choices):
                raise ConfigError(f"{where}: choices must be strings, numbers or booleans")
            space[key] = Param(key, kind, choices=tuple(choices))
            continue
        number = int if kind == "int" else (int, float)
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, number):
                raise ConfigError(f"{where}: {name} must be {'an integer' if kind == 'int' else 'a number'} (got {v!r})")
        if not low < high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false")
        if log and low <= 0:
            raise ConfigError(f"{where}: log = true needs low > 0 (got {low})")
        if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0 or log):
            raise ConfigError(f"{where}: step must be a positive number, and cannot go with log = true")
        space[key] = Param(key, kind, low, high, log, step)
    return space


def param_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def check_space(space: dict[str, Param], config: Path | None, overrides: list[str]) -> Config:
    """The base config, checked with every bound and choice of the space applied one at a time."""
    base = load_config(config, overrides)
    for p in space.values():
        for v in p.bounds():
            try:
                load_config(config, [*overrides, *param_overrides({p.key: v})])
            except ConfigError as e:
                raise ConfigError(f"space: [\"{p.key}\"] value {v!r} makes an invalid config: {e}") from None
    if not base.train.eval_steps:
        raise ConfigError("sweep: trials are scored on validation loss; set train.eval_steps > 0")
    return base


def suggest(trial: Any, space: dict[str, Param]) -> dict[str, Any]:
    out = {}
    for p in space.values():
        if p.type == "categorical":
            out[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.type == "int":
            out[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return out


# ---------------------------------------------------------------------------------------------
# Inside a trial (rank 0 talks to the study; every rank votes)


# ---------------------------------------------------------------------------------------------
# The sweep process


def _finished(study: Any) -> list[Any]:
    """Trials that count towards --trials: complete, pruned, or failed by their own run (a trial the
    sweep lost, by a kill or an interruption, does not count)."""
    states = study._storage.get_all_trials(study._study_id, deepcopy=False)
    ts = _optuna().trial.TrialState
    return [t for t in states if t.state in (ts.COMPLETE, ts.PRUNED)
            or (t.state == ts.FAIL and t.user_attrs.get("fail_reason") and not t.user_attrs.get("interrupted"))]


def _last_val_loss(run_dir: Path) -> float | None:
    value = None
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "val_loss" in rec:
                    value = rec["val_loss"]
    return None if value is None else float(value)


def _error_line(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [""])[-1][:300]
    return ""


def _trial_cmd(args: argparse.Namespace, params: dict[str, Any], run_dir: Path) -> list[str]:
    train_args = [*(["--config", str(args.config)] if args.config else []), *args.overrides,
                  *param_overrides(params), f"run.out_dir={run_dir}"]
    if args.nproc == 1:
        return [sys.executable, "-m", "scaletrain", "train", *train_args]
    # Each worker starts as `python -m scaletrain.procs`, which ties it to torchrun before anything else.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "-m", "scaletrain.procs", "train", *train_args]


def _run_trial(args: argparse.Namespace, study: Any, trial: Any, params: dict[str, Any], url: str,
               out: Path) -> None:
    optuna = _optuna()
    ts = optuna.trial.TrialState
    run_dir = out / f"trial-{trial.number}"
    run_dir.mkdir(parents=True, exist_ok=True)
    trial.set_user_attr("run_dir", str(run_dir))
    env = {**os.environ, ENV_TRIAL: str(trial._trial_id), ENV_STORAGE: url, ENV_STUDY: study.study_name,
           ENV_PRUNER: "none" if args.pruner == "none" else
           f"median:{args.pruner_startup_trials}:{args.pruner_warmup_steps}"}
    log_path = run_dir / "sweep-trial.log"
    print(f"trial {trial.number}: {params} -> {run_dir}", flush=True)
    with open(log_path, "ab") as log_file:
        proc = start_child(_trial_cmd(args, params, run_dir), stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            study._storage.record_heartbeat(trial._trial_id)
            try:
                rc = proc.wait(timeout=args.heartbeat_interval)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        kill_group(proc)
        trial.set_user_attr("fail_reason", "the sweep was interrupted")
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=ts.FAIL)
        raise
    attrs = study._storage.get_trial(trial._trial_id).user_attrs
    value = _last_val_loss(run_dir)
    if rc == 0 and "pruned_at_step" in attrs:
        study.tell(trial, state=ts.PRUNED)
    elif "fail_reason" in attrs:
        study.tell(trial, state=ts.FAIL)
    elif rc != 0:
        trial.set_user_attr("fail_reason", f"exit code {rc}: {_error_line(log_path)} (see {log_path})")
        study.tell(trial, state=ts.FAIL)
    elif value is None or not math.isfinite(value):
        trial.set_user_attr("fail_reason", f"no finite validation loss in {run_dir / 'metrics.jsonl'}")
        study.tell(trial, state=ts.FAIL)
    else:
        study.tell(trial, value)


def _table(study: Any) -> str:
    rows = [("trial", "state", "value", "params", "run folder")]
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        value = "" if t.value is None else f"{t.value:.4f}"
        if t.state.name == "PRUNED" and t.intermediate_values:
            value = f"{t.intermediate_values[max(t.intermediate_values)]:.4f} @{max(t.intermediate_values)}"
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        state = t.state.name + (f" ({t.user_attrs['fail_reason']})" if "fail_reason" in t.user_attrs else "")
        rows.append((str(t.number), state, value, params, t.user_attrs.get("run_dir", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths)), r[4]]).rstrip() for r in rows)


def run_sweep(args: argparse.Namespace) -> int:
    optuna = _optuna()
    if args.backend:  # a registry spec (ddp, fsdp:hybrid_shard, deepspeed:3+offload, ...) for every trial
        from scaletrain.engines.registry import spec_overrides

        args.overrides = [*(f"{k}={v}" for k, v in spec_overrides(args.backend).items()), *args.overrides]
    space = load_space(args.space)
    check_space(space, args.config, args.overrides)
    name = args.study or (Path(args.config).stem if args.config else "sweep")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{name}"
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=args.heartbeat_interval,
                                             grace_period=args.grace_period)
    except Exception as e:  # a bad URL, a missing driver
        raise ConfigError(f"--storage {url}: {type(e).__name__}: {e}") from None
    pruner = make_pruner("none" if args.pruner == "none"
                         else f"median:{args.pruner_startup_trials}:{args.pruner_warmup_steps}")
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="minimize",
                                pruner=pruner)
    optuna.storages.fail_stale_trials(study)  # trials of a sweep that was killed

    try:
        with interrupt_scope():
            while len(_finished(study)) < args.trials:
                # Seeded by the study's size, so a continued sweep draws as an uninterrupted one would.
                study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
                trial = study.ask()
                _run_trial(args, study, trial, suggest(trial, space), url, out)
    except Interrupted as e:
        print(f"sweep interrupted by {e}; run the same command again to continue", file=sys.stderr)
        return 130
    print(_table(study))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("no trial completed; no best.toml written", file=sys.stderr)
        return 1
    best = study.best_trial
    cfg = load_config(args.config, [*args.overrides, *param_overrides(best.params)])
    (out / "best.toml").write_text(config_to_toml(cfg))
    print(f"best: trial {best.number} value {best.value:.4f} {best.params}; config in {out / 'best.toml'}")
    return 0
