"""Item 15: a torn metrics.jsonl does not break resume; truncation is atomic."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from scaletrain.train.metrics import truncate_metrics


def test_truncate_metrics_torn_last_line(tmp_path: Path, caplog) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # power loss mid-write
    with caplog.at_level(logging.WARNING):
        truncate_metrics(path, after_step=3)
    steps = [json.loads(ln)["step"] for ln in path.read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "1 line" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind


def test_truncate_metrics_missing_file_is_noop(tmp_path: Path) -> None:
    truncate_metrics(tmp_path / "metrics.jsonl", after_step=3)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_off_a_terminal_the_sink_draws_no_bar_and_keeps_its_lines_on_stderr(tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    """Pipes and CI logs: no progress bar, metric lines on stderr and log lines on stdout, as they were."""
    from scaletrain import logs
    from scaletrain.config import LoggingConfig
    from scaletrain.train.metrics import RankZeroSink

    monkeypatch.setattr(logs, "_console", None)  # a fresh process console, on pytest's captured stdout
    tree = logging.getLogger("scaletrain")
    before = (list(tree.handlers), tree.propagate, tree.level)
    logs.setup_logging("info", 0)
    try:
        sink = RankZeroSink(tmp_path, LoggingConfig(), {})
        assert sink.console is not logs.console()  # stdout and stderr are pipes here: nothing to share
        sink.start(total_steps=10, first_step=0)
        assert sink._progress is None
        sink.log({"step": 1, "loss": 2.5, "lr": 1e-3, "step_ms": 3.0}, console=True)
        logging.getLogger("scaletrain.test").info("saved checkpoint somewhere")
        sink.close()
    finally:  # put back what setup_logging changed (caplog needs the tree to propagate)
        tree.handlers[:], tree.propagate = before[0], before[1]
        tree.setLevel(before[2])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["step 1 | loss 2.5000 | lr 1.00e-03 | step_ms 3.0"]
    assert "saved checkpoint somewhere" in captured.out and "step 1" not in captured.out


def test_on_a_terminal_the_bar_and_the_log_lines_share_one_console(monkeypatch) -> None:
    from rich.console import Console

    from scaletrain import logs

    monkeypatch.setattr(logs, "_console", Console(force_terminal=True))
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert logs.live_console() is logs.console()
