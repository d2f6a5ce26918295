"""Where step records go: `metrics.jsonl` and a rich console on rank 0, optional trackers, and a
sink that does nothing on every other rank (so call sites never branch on rank).

Also the end-of-run summary (`run_summary`, printed by `SummaryCallback`).
Never runs a collective. Imports: rich, `scaletrain.config`, `scaletrain.train.callbacks`,
`scaletrain.checkpoint.layout`, `scaletrain.io` (truncating on resume), `scaletrain.logs` (the console the
progress bar shares with the log lines).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from scaletrain.checkpoint import layout
from scaletrain.config import LoggingConfig
from scaletrain.io import write_atomic
from scaletrain.logs import live_console
from scaletrain.train.callbacks import Callback, RunInfo

log = logging.getLogger(__name__)


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, keep the records with `step <= after_step` (later steps will run and log again).

    A line that does not parse (a torn last line after power loss) is dropped with a warning rather
    than failing every resume. The file is replaced atomically (`scaletrain.io.write_atomic`), so a
    crash here leaves either the old or the new file."""
    path = Path(path)
    if not path.is_file():
        return
    kept, bad = _records_up_to(path, after_step)
    if bad:
        log.warning("%s: dropped %d line(s) that do not parse (a torn write?)", path, bad)
    write_atomic(path, "".join(kept))


def _records_up_to(path: Path, after_step: int) -> tuple[list[str], int]:
    """The JSONL lines of `path` whose `step <= after_step`, re-serialised, and how many did not parse."""
    kept: list[str] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = record.get("step", 0) if isinstance(record, dict) else None
                if not isinstance(step, (int, float)) or isinstance(step, bool):
                    raise ValueError("no numeric step")
            except ValueError:
                bad += 1
                continue
            if step <= after_step:
                kept.append(json.dumps(record) + "\n")
    return kept, bad


class NullSink:
    """What ranks other than 0 get."""

    def start(self, total_steps: int, first_step: int) -> None: ...
    def log(self, record: dict[str, Any], *, console: bool) -> None: ...
    def log_checkpoint(self, step: int, tag_dir: Path) -> None: ...
    def close(self) -> None: ...


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ",.0f"), ("step_ms", ".1f")):
        if key in record and record[key] is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    for key, value in record.items():  # eval.metrics_fn's metrics, e.g. val_accuracy
        if key.startswith("val_") and key != "val_loss" and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    for key in ("mfu", "max_mem_gb"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.3f}")
    if record.get("eta_s") is not None and record["eta_s"] > 0:
        m, sec = divmod(int(record["eta_s"]), 60)
        parts.append(f"eta {m // 60}:{m % 60:02d}:{sec:02d}")
    if record.get("skipped"):
        parts.append(f"skipped ({record.get('skipped_total', 1)} so far)")
    return " | ".join(parts)


class RankZeroSink:
    """JSONL file (every record), console lines and a progress bar, trackers if configured."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_config: dict[str, Any]) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.console = live_console()  # the log console on a terminal: log lines print above the bar
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self._progress: Progress | None = None
        self._task = None
        self._trackers = [t for t in (_make_tracker(name, run_dir, run_config) for name in cfg.trackers) if t]

    def start(self, total_steps: int, first_step: int) -> None:
        if not self.cfg.console or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=first_step, info="")
        self._progress.start()

    def log(self, record: dict[str, Any], *, console: bool) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        for tracker in self._trackers:
            tracker.log(clean)
        if self._progress is not None and "loss" in record:
            self._progress.update(self._task, completed=record["step"], info=f"loss {record['loss']:.4f}")
        if console and self.cfg.console:
            line = _fmt(record)
            if self._progress is not None:
                self._progress.console.print(line, highlight=False)
            else:
                self.console.print(line, highlight=False)

    def log_checkpoint(self, step: int, tag_dir: Path) -> None:
        """A committed (or queued) checkpoint tag: every tracker records its name and path."""
        for tracker in self._trackers:
            tracker.log_checkpoint(step, Path(tag_dir).name, str(tag_dir))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for tracker in self._trackers:
            tracker.close()
        self._file.close()


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to one level with dotted keys (`model.n_layer`). Values a tracker can show as
    they are (bool, int, float, str) stay; None, lists and anything else become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _numeric(rec: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, without `step` (the x axis) and flags (booleans)."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    """Event files in `<run_dir>/tb/`: one scalar per metric by step, the flattened config as hparams
    (the HPARAMS tab), and a text entry `checkpoint` per saved tag."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.w = SummaryWriter(str(run_dir / "tb"))
        # add_hparams would open a second event folder; writing the three summaries here keeps one run.
        for summary in hparams(flatten_config(config), {}):
            self.w.file_writer.add_summary(summary)

    def log(self, rec: dict[str, Any]) -> None:
        for k, v in _numeric(rec).items():
            self.w.add_scalar(k, v, rec["step"])

    def log_checkpoint(self, step: int, tag: str, path: str) -> None:
        self.w.add_text("checkpoint", f"{tag} {path}", step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def mlflow_tracking_uri(run_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in `<run_dir>/mlruns/mlflow.db` (MLflow 3
    refuses its old plain-file store unless told otherwise)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / 'mlruns').resolve()}/mlflow.db"


class _MLflow:
    """One MLflow run per invocation, in experiment `scaletrain` of `mlflow_tracking_uri(run_dir)`:
    the flattened config as params, every metric by step, a tag `checkpoint.<tag>` per saved tag and
    `config.json` as an artifact. Uses a client bound to that store, never MLflow's global state."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = mlflow_tracking_uri(run_dir)
        if uri.startswith("sqlite:///"):
            (Path(run_dir) / "mlruns").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name("scaletrain")
        if exp is not None:
            exp_id = exp.experiment_id
        elif uri.startswith("sqlite:///"):
            artifacts = (Path(run_dir) / "mlruns" / "artifacts").resolve().as_uri()
            exp_id = self.client.create_experiment("scaletrain", artifact_location=artifacts)
        else:
            exp_id = self.client.create_experiment("scaletrain")
        self.run_id = self.client.create_run(exp_id, run_name=config.get("run", {}).get("name")).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten_config(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, rec: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, int(rec["step"])) for k, v in _numeric(rec).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_checkpoint(self, step: int, tag: str, path: str) -> None:
        self.client.set_tag(self.run_id, f"checkpoint.{tag}", path)
        self.client.set_tag(self.run_id, "checkpoint.latest", tag)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    """A W&B run in `<run_dir>/wandb/`, offline unless `WANDB_MODE` says otherwise (`wandb sync`
    uploads it later): the flattened config, every metric by step, and per saved tag a summary entry
    `checkpoint/<tag>` (the path) plus `checkpoint/latest`."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        self.run = wandb.init(name=config.get("run", {}).get("name"), dir=str(run_dir), config=flatten_config(config),
                              mode=os.environ.get("WANDB_MODE", "offline"), project=os.environ.get(
                                  "WANDB_PROJECT", "scaletrain"), settings=settings)

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(_numeric(rec), step=int(rec["step"]))

    def log_checkpoint(self, step: int, tag: str, path: str) -> None:
        self.run.summary[f"checkpoint/{tag}"] = path
        self.run.summary["checkpoint/latest"] = tag

    def close(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def _make_tracker(name: str, run_dir: Path, config: dict[str, Any]):
    try:
        return _TRACKERS[name](run_dir, config)
    except ImportError:
        log.warning("logging.trackers: %s is not installed (pip install 'scaletrain[%s]'); skipping it", name, name)
        return None


def make_sink(is_main: bool, run_dir: Path, cfg: LoggingConfig, run_config: dict[str, Any]):
    return RankZeroSink(run_dir, cfg, run_config) if is_main else NullSink()


class Throughput:
    """Tokens per second and step time over the steps since the last report."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "step_ms": 1000 * dt / max(self._steps, 1)}
        self._t, self._tokens, self._steps = now, 0, 0
        return out


def _hms(seconds: float) -> str:
    m, sec = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def run_summary(run_dir: Path, *, first_step: int, last_step: int, wall_s: float, tokens: int,
                final_val_loss: float | None, best_val_loss: float | None, ended: str = "finished") -> list[str]:
    """The lines printed at the end of a run: steps, wall time, tokens, final and best validation
    loss, the latest and best checkpoints (from `<run_dir>/ckpt`'s pointers) and the command that
    exports the latest one (and the best one when it differs). `tokens` is the run's total so far."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "ckpt"
    done = last_step - first_step
    lines = [f"run {ended}: {run_dir} at step {last_step} ({done} step{'s' if done != 1 else ''} in {_hms(wall_s)}"
             + (f", resumed from step {first_step})" if first_step else ")")]
    rate = f" ({tokens / wall_s:,.0f} tokens/s over this invocation's wall time)" if wall_s > 0 and done else ""
    lines.append(f"tokens: {tokens:,}{rate}")
    if final_val_loss is None and best_val_loss is None:
        lines.append("validation loss: not evaluated (train.eval_steps=0 or no evaluation step reached)")
    else:
        final = "-" if final_val_loss is None else f"{final_val_loss:.4f}"
        best = "-" if best_val_loss is None else f"{best_val_loss:.4f}"
        lines.append(f"validation loss: final {final}, best {best}")
    latest, best_tag = layout.read_pointer(ckpt), layout.read_pointer(ckpt, layout.BEST_FILE)
    if latest is None:
        lines.append(f"checkpoints: none in {ckpt}")
        return lines
    lines.append(f"checkpoint latest: {ckpt / latest}")
    if best_tag is not None:
        lines.append(f"checkpoint best:   {ckpt / best_tag}")
    for tag in dict.fromkeys(t for t in (latest, best_tag) if t is not None):
        out = run_dir / "consolidated" / f"{tag}.safetensors"
        lines.append(f"export {tag}: scaletrain consolidate {shlex.quote(str(ckpt / tag))} --out {shlex.quote(str(out))}")
    return lines


class SummaryCallback(Callback):
    """Prints `run_summary` on rank 0 when a run ends normally (not after an error). The loop adds it
    to its callback list after the sink: `CallbackList([SinkCallback(...), SummaryCallback(), *user])`;
    it reads `state.step`, `state.tokens`, `state.best_val_loss` and the result's `final_val_loss`,
    `preempted`, `stopped`. Wall time runs from `on_train_start`. Local; rank 0 writes, via logging."""

    def __init__(self, printer: Any = None) -> None:
        self._print = printer or log.info
        self._t0 = time.perf_counter()
        self._first_step = 0

    def on_train_start(self, run: RunInfo, state: Any) -> None:
        self._t0 = time.perf_counter()
        self._first_step = state.step

    def on_train_end(self, run: RunInfo, state: Any, result: Any) -> None:
        if result is None or not run.is_main:
            return
        ended = ("stopped by a signal" if getattr(result, "preempted", False)
                 else "stopped by a callback" if getattr(result, "stopped", False) else "finished")
        for line in run_summary(run.run_dir, first_step=self._first_step, last_step=state.step,
                                wall_s=time.perf_counter() - self._t0, tokens=state.tokens,
                                final_val_loss=getattr(result, "final_val_loss", None),
                                best_val_loss=state.best_val_loss, ended=ended):
            self._print(line)


def layer_norm_record(norms: dict[str, float]) -> dict[str, Any]:
    """Per-layer gradient norms (`engine.layer_grad_norms()`) as record fields: `grad_norm/<layer>`
    for each, plus `grad_norm_max_layer` (the name of the largest; a string, so JSONL keeps it and
    trackers skip it). The loop merges this into the step's record: `record.update(...)`."""
    if not norms:
        return {}
    out: dict[str, Any] = {f"grad_norm/{k}": v for k, v in norms.items()}
    finite = {k: v for k, v in norms.items() if math.isfinite(v)}
    if finite:
        out["grad_norm_max_layer"] = max(finite, key=finite.__getitem__)
    return out
