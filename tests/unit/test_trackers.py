"""Each tracker, fed through the rank-0 sink, is read back with its own back end's reader: the config
as params, every numeric metric by step, and the checkpoint tags. No process group needed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from scaletrain.config import LoggingConfig
from scaletrain.train.metrics import RankZeroSink, flatten_config

CONFIG = {"run": {"name": "tiny", "seed": 3}, "model": {"n_layer": 2, "n_embd": 32, "factory": None},
          "optim": {"lr": 0.01, "betas": [0.9, 0.95]}}
RECORDS = [
    {"step": 1, "loss": 4.0, "lr": 0.001, "grad_norm": 1.5, "tokens": 128},
    {"step": 2, "loss": 3.5, "lr": 0.002, "grad_norm": float("nan"), "tokens": 256, "skipped": True},
    {"step": 3, "loss": 3.0, "lr": 0.003, "grad_norm": 1.2, "tokens": 384, "val_loss": 3.25, "tokens_per_s": 900.0},
]


def _drive(tmp_path: Path, tracker: str) -> Path:
    sink = RankZeroSink(tmp_path, LoggingConfig(trackers=(tracker,), console=False), CONFIG)
    sink.start(3, 0)
    for rec in RECORDS:
        sink.log(dict(rec), console=False)
    sink.log_checkpoint(3, tmp_path / "ckpt" / "step_00000003")
    sink.close()
    return tmp_path


def test_flatten_config():
    flat = flatten_config(CONFIG)
    assert flat == {"run.name": "tiny", "run.seed": 3, "model.n_layer": 2, "model.n_embd": 32,
                    "model.factory": "null", "optim.lr": 0.01, "optim.betas": "[0.9, 0.95]"}


def test_tensorboard_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _drive(tmp_path, "tensorboard")
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 4.0), (2, 3.5), (3, 3.0)]
    assert [e.step for e in ea.Scalars("grad_norm")] == [1, 3]  # the nan is not a point
    assert [(e.step, e.value) for e in ea.Scalars("val_loss")] == [(3, 3.25)]
    assert "skipped" not in ea.Tags()["scalars"]
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["model.n_layer"].number_value == 2 and hp["run.name"].string_value == "tiny"
    assert hp["optim.betas"].string_value == "[0.9, 0.95]"
    (text,) = ea.Tensors("checkpoint/text_summary")
    assert text.step == 3 and text.tensor_proto.string_val[0].decode().startswith("step_00000003 ")


def test_mlflow_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from scaletrain.train.metrics import mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _drive(tmp_path, "mlflow")
    uri = mlflow_tracking_uri(tmp_path)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("scaletrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == "2" and run.data.params["optim.lr"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.0), (2, 3.5), (3, 3.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "grad_norm")] == [1, 3]
    assert run.data.tags["checkpoint.step_00000003"].endswith("step_00000003")
    assert run.data.tags["checkpoint.latest"] == "step_00000003"


def _wandb_records(path: Path):
    """The records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB-style
    log blocks of 32 KiB, each chunk a 7-byte header (crc32c, little-endian length, type) and bytes;
    a record spans FIRST/MIDDLE/LAST chunks or is one FULL chunk. Parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def test_wandb_offline_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _drive(tmp_path, "wandb")
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    config: dict = {}
    history: dict[int, dict] = {}
    summary: dict = {}
    kinds = []
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        kinds.append(kind)
        if kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            for item in items:  # a config value is stored bare or as {"value": ...}
                value = json.loads(item.value_json)
                config[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    assert config.get("model.n_layer") == 2 and config.get("run.name") == "tiny", (config, kinds)
    assert {s: r["loss"] for s, r in history.items()} == {1: 4.0, 2: 3.5, 3: 3.0}
    assert "grad_norm" not in history[2] and history[3]["val_loss"] == 3.25
    assert summary["checkpoint/latest"] == "step_00000003"
    assert summary["checkpoint/step_00000003"].endswith("step_00000003")


def test_sink_callback_forwards_saves(tmp_path):
    from types import SimpleNamespace

    from scaletrain.train.callbacks import SinkCallback

    seen = []

    class Sink:
        def log_checkpoint(self, step, tag_dir):
            seen.append((step, Path(tag_dir).name))

    SinkCallback(Sink()).on_save(None, SimpleNamespace(step=7), tmp_path / "step_00000007")
    assert seen == [(7, "step_00000007")]


def test_run_summary_text(tmp_path):
    from scaletrain.train.metrics import run_summary

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000020\n")
    (ckpt / "best").write_text("step_00000010\n")
    lines = run_summary(tmp_path, first_step=5, last_step=20, wall_s=3725.0, tokens=40960,
                        final_val_loss=3.5, best_val_loss=3.25)
    assert lines[0] == f"run finished: {tmp_path} at step 20 (15 steps in 1:02:05, resumed from step 5)"
    assert lines[1].startswith("tokens: 40,960 (11 tokens/s")
    assert lines[2] == "validation loss: final 3.5000, best 3.2500"
    assert lines[3] == f"checkpoint latest: {ckpt / 'step_00000020'}"
    assert lines[4] == f"checkpoint best:   {ckpt / 'step_00000010'}"
    assert lines[5] == (f"export step_00000020: scaletrain consolidate {ckpt / 'step_00000020'} "
                        f"--out {tmp_path / 'consolidated' / 'step_00000020.safetensors'}")
    assert lines[6].startswith("export step_00000010: scaletrain consolidate ")
    assert len(lines) == 7


def test_run_summary_without_eval_or_checkpoints(tmp_path):
    from types import SimpleNamespace

    from scaletrain.train.callbacks import RunInfo
    from scaletrain.train.metrics import SummaryCallback

    printed: list[str] = []
    cb = SummaryCallback(printer=printed.append)
    info = RunInfo(tmp_path, 0, 1, 4, {})
    cb.on_train_start(info, SimpleNamespace(step=0))
    state = SimpleNamespace(step=4, tokens=512, best_val_loss=None)
    cb.on_train_end(RunInfo(tmp_path, 1, 2, 4, {}), state, SimpleNamespace(final_val_loss=None))
    assert printed == []  # rank 1 says nothing
    cb.on_train_end(info, state, None)
    assert printed == []  # nor after an error
    cb.on_train_end(info, state, SimpleNamespace(final_val_loss=None, preempted=True))
    assert printed[0].startswith(f"run stopped by a signal: {tmp_path} at step 4 (4 steps in 0:00:00)")
    assert printed[2].startswith("validation loss: not evaluated")
    assert printed[3] == f"checkpoints: none in {tmp_path / 'ckpt'}" and len(printed) == 4


@pytest.mark.timeout(120)
def test_real_one_process_run_reaches_tensorboard(tiny_data, tmp_path):
    """The loop's own save events reach the tracker (SinkCallback.on_save), end to end."""
    pytest.importorskip("tensorboard")
    from helpers import tiny_overrides, train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_overrides(tiny_data, out, **{"train.max_steps": 3, "checkpoint.every": 2,
                                            "logging.trackers": ["tensorboard"]}), nproc=1, timeout=100)
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]
    texts = [(t.step, t.tensor_proto.string_val[0].decode().split()[0]) for t in ea.Tensors("checkpoint/text_summary")]
    assert texts == [(2, "step_00000002"), (3, "step_00000003")]
