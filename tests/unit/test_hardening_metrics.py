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
