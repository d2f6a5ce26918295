"""`scaletrain plot`: lines per panel for two runs, the PNG opens, and bad input is exit 2."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from scaletrain import cli
from scaletrain.train import plot


def _run(path: Path, steps: int, *, val_every: int = 5, scale: float = 1.0) -> Path:
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": scale * (4 + math.exp(-s / 5)), "lr": 1e-3 * min(1, s / 3),
               "grad_norm": None if s == 4 else 1.0 / s, "tokens": 64 * s}
        if s % 2 == 0:
            rec.update(tokens_per_s=1000.0 + 10 * s, step_ms=12.0)
        if s % val_every == 0:
            rec["val_loss"] = scale * (4.1 + math.exp(-s / 5))
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 99, \"lo")  # a torn last line
    return path


def test_two_runs_lines_per_panel(tmp_path):
    a, b = _run(tmp_path / "run_a", 20), _run(tmp_path / "run_b", 12, scale=1.1)
    fig = plot.make_figure([a, b])
    axes = fig.axes
    titles = [ax.get_title() for ax in axes[:5]]
    assert titles == ["train loss", "validation loss", "learning rate", "gradient norm", "tokens / s"]
    assert [len(ax.get_lines()) for ax in axes[:5]] == [4, 2, 2, 2, 2]  # raw + EMA per run, then 1 per run
    assert not axes[5].get_visible()
    raw_a, ema_a = axes[0].get_lines()[:2]
    assert list(raw_a.get_xdata()) == list(range(1, 21)) and raw_a.get_label() == "run_a (raw)"
    assert list(axes[1].get_lines()[0].get_xdata()) == [5, 10, 15, 20]
    assert 4 not in list(axes[3].get_lines()[0].get_xdata())  # a null grad_norm is not a point
    assert [t.get_text() for t in axes[2].get_legend().get_texts()] == ["run_a", "run_b"]
    # the smoothed line is smoother: smaller total variation than the raw one
    tv = [sum(abs(y1 - y0) for y0, y1 in itertools.pairwise(ys)) for ys in (raw_a.get_ydata(), ema_a.get_ydata())]
    assert tv[1] < tv[0]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_ema_is_debiased():
    assert plot.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert plot.ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_cli_writes_png_that_opens(tmp_path, capsys):
    import matplotlib.image as mpimg

    a, b = _run(tmp_path / "run_a", 10), _run(tmp_path / "run_b", 10, scale=0.9)
    out = tmp_path / "out" / "curves.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out)]) == 0
    image = mpimg.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0  # not a blank page
    assert plot.write_curves(a) == a / "curves.png" and (a / "curves.png").is_file()


def test_missing_metrics_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl does not exist" in err[0]
    assert plot.write_curves(tmp_path / "empty") is None  # the loop's call never fails a run


def test_missing_matplotlib_is_exit_2(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    a = _run(tmp_path / "run_a", 3)
    assert cli.main(["plot", str(a)]) == 2
    assert "pip install 'scaletrain[plot]'" in capsys.readouterr().err
