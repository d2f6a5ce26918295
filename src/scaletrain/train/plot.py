"""`scaletrain plot RUN_DIR [RUN_DIR ...] --out curves.png`: training curves from runs' metrics.jsonl.

Five panels against the optimizer step: train loss (raw, thin, and an exponential moving average,
bias-corrected as TensorBoard's smoothing is), validation loss, learning rate, gradient norm and
tokens per second. Several runs are overlaid, one colour per run, labelled with the run folder's
name. Records whose value is missing or null (a skipped step's grad_norm) are left out of that panel.

matplotlib (the `[plot]` extra) is imported only when a plot is drawn, with the Agg backend, so no
display is needed. Exit codes: 0 written; 2 bad input (no metrics.jsonl in a run folder, no
matplotlib): one line on stderr. The loop calls `write_curves(run_dir)` at the end of a run when
`logging.plot=true`. Imports: `scaletrain.errors`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scaletrain.errors import ConfigError, DataError

# (panel title, record field, y scale)
PANELS = (
    ("train loss", "loss", "linear"),
    ("validation loss", "val_loss", "linear"),
    ("learning rate", "lr", "linear"),
    ("gradient norm", "grad_norm", "log"),
    ("tokens / s", "tokens_per_s", "linear"),
)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl` (a torn last line is skipped); DataError if absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"plot: {path} does not exist; pass a run folder (run.out_dir) that has logged steps")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            out.append(rec)
    return out


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one field, finite values only, the last record of a step winning."""
    by_step: dict[float, float] = {}
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[rec["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average: s_t = a*s_{t-1} + (1-a)*x_t, divided by 1 - a^t."""
    out, acc = [], 0.0
    for t, x in enumerate(values, start=1):
        acc = smoothing * acc + (1 - smoothing) * x
        out.append(acc / (1 - smoothing**t) if smoothing < 1 else x)
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot: matplotlib is not installed; pip install 'scaletrain[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_figure(run_dirs: list[Path], *, smoothing: float = 0.9) -> Any:
    """A matplotlib Figure with one axis per entry of PANELS (in that order, then one hidden spare),
    every run drawn into each panel that it has values for: the train-loss panel holds a raw and a
    smoothed line per run, the others one line per run."""
    plt = _pyplot()
    runs = [(Path(d).resolve().name or str(d), read_records(Path(d))) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    flat = list(axes.flat)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, key, scale), ax in zip(PANELS, flat, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        for i, (label, records) in enumerate(runs):
            steps, values = series(records, key)
            if not steps:
                continue
            color = colors[i % len(colors)]
            if key == "loss":
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8, label=f"{label} (raw)")
                ax.plot(steps, ema(values, smoothing), color=color, linewidth=1.6, label=f"{label} (EMA {smoothing})")
            else:
                ax.plot(steps, values, color=color, linewidth=1.4, marker="o" if key == "val_loss" else None,
                        markersize=3, label=label)
        if scale == "log" and ax.get_lines():
            ax.set_yscale("log")
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    for ax in flat[len(PANELS):]:
        ax.set_visible(False)
    return fig


def plot_runs(run_dirs: list[Path], out: Path, *, smoothing: float = 0.9) -> Path:
    """Draw the runs and write the PNG to `out` (its folder is created). Returns `out`."""
    fig = make_figure(run_dirs, smoothing=smoothing)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def write_curves(run_dir: Path) -> Path | None:
    """What the loop calls on rank 0 after the last step when `logging.plot=true`: writes
    `<run_dir>/curves.png`. Never fails the run: missing matplotlib or metrics is a warning, None."""
    import logging

    try:
        return plot_runs([Path(run_dir)], Path(run_dir) / "curves.png")
    except (ConfigError, DataError) as e:
        logging.getLogger(__name__).warning("logging.plot: %s", e)
        return None
