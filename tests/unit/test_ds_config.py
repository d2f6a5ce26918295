"""The DeepSpeed JSON resolver: "auto" filling, conflicts in one line, the shipped configs, the CLI's exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO, tiny_overrides, train

from scaletrain.config import load_config
from scaletrain.engines.ds_config import resolve_ds_config
from scaletrain.errors import ConfigError

SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def _write(tmp_path: Path, body: dict | str, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def _resolve(*overrides: str, ds: Path | None = None, world: int = 2) -> dict:
    return resolve_ds_config(load_config(None, overrides, ds_config=ds), world_size=world)


def test_auto_values_come_from_the_harness_config():
    ds = _resolve("train.micro_batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5", "precision=bf16",
                  ds=REPO / "ds_configs" / "zero2.json")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2


def test_global_batch_size_derives_accumulation_like_the_loop():
    ds = _resolve("train.micro_batch_size=2", "train.global_batch_size=16", ds=REPO / "ds_configs" / "zero1.json")
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=re.escape("train.global_batch_size (15)")):
        _resolve("train.micro_batch_size=2", "train.global_batch_size=15")


def test_fp32_enables_neither_half_precision():
    ds = _resolve(ds=REPO / "ds_configs" / "zero3.json")
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_every_conflict_is_reported_in_one_line(tmp_path: Path):
    path = _write(tmp_path, {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5, "bf16": {"enabled": True},
                             "train_batch_size": "auto", "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError) as e:
        _resolve("train.micro_batch_size=4", ds=path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "3 value(s) disagree" in msg
    assert "train_micro_batch_size_per_gpu=3 but train.micro_batch_size gives 4" in msg
    assert "gradient_clipping=0.5 but train.grad_clip gives 1.0" in msg
    assert "bf16.enabled=true but precision=fp32 gives false" in msg


def test_matching_explicit_values_are_accepted(tmp_path: Path):
    path = _write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                             "train_batch_size": 8, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}})
    assert _resolve("train.micro_batch_size=4", ds=path)["zero_optimization"]["stage"] == 1


def test_stage_and_offload_overrides_against_the_file():
    z2 = REPO / "ds_configs" / "zero2.json"
    with pytest.raises(ConfigError, match=re.escape("zero_optimization.stage=2 but backend.deepspeed.stage gives 3")):
        _resolve("backend.deepspeed.stage=3", ds=z2)
    with pytest.raises(ConfigError, match=re.escape("offload_optimizer.device=\"cpu\" but backend.deepspeed.offload_optimizer")):
        _resolve("backend.deepspeed.offload_optimizer=false", ds=REPO / "ds_configs" / "zero2_offload.json")
    ds = _resolve("backend.deepspeed.stage=2", "backend.deepspeed.offload_optimizer=true", ds=z2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_without_a_file_the_flags_build_the_config():
    assert _resolve("backend=deepspeed")["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 25_000_000,
                                                                  "allgather_bucket_size": 25_000_000}
    ds = _resolve("backend=deepspeed", "backend.deepspeed.stage=3", "backend.deepspeed.offload_optimizer=true",
                  "backend.deepspeed.offload_param=true")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match=re.escape("parameter offload needs ZeRO stage 3")):
        _resolve("backend=deepspeed", "backend.deepspeed.offload_param=true")
    with pytest.raises(ConfigError, match=re.escape("use backend=ddp")):
        _resolve("backend=deepspeed", "backend.deepspeed.stage=0")


def test_optimizer_section_is_filled_and_checked(tmp_path: Path):
    body = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": 0.1}},
            "zero_optimization": {"stage": 2}}
    ds = _resolve("optim.lr=0.003", ds=_write(tmp_path, body))
    assert ds["optimizer"]["params"] == {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    body["optimizer"]["params"]["lr"] = 0.1
    with pytest.raises(ConfigError, match=re.escape("optimizer.params.lr=0.1 but optim.lr gives 0.003")):
        _resolve("optim.lr=0.003", ds=_write(tmp_path, body))
    with pytest.raises(ConfigError, match=re.escape("optimizer.type 'Lamb'")):
        _resolve(ds=_write(tmp_path, {"optimizer": {"type": "Lamb"}, "zero_optimization": {"stage": 2}}))


def test_auto_without_a_harness_value_is_an_error(tmp_path: Path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": "auto"}})
    with pytest.raises(ConfigError, match=re.escape("zero_optimization.overlap_comm")):
        _resolve(ds=path)


def test_memory_limits_default_to_sizes_that_fit_beside_the_model(tmp_path: Path):
    """DeepSpeed's own defaults (5e8-element buckets, 1e9 live parameters) made ZeRO-3's peak exceed
    DDP's on a 150 M model; the harness fills smaller ones where the JSON is silent or says "auto",
    and keeps explicit values."""
    zero = _resolve("backend=deepspeed", "backend.deepspeed.stage=3")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 25_000_000 and zero["stage3_max_live_parameters"] == 50_000_000
    assert zero["stage3_max_reuse_distance"] == 50_000_000 and zero["stage3_prefetch_bucket_size"] == 25_000_000
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123, "stage3_max_live_parameters": "auto"}})
    zero = _resolve(ds=path)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["stage3_max_live_parameters"] == 50_000_000


def test_missing_and_malformed_files_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=re.escape("nope.json not found")):
        _resolve(ds=tmp_path / "nope.json")
    bad = _write(tmp_path, '{"zero_optimization": {"stage": 2,}}', "bad.json")
    with pytest.raises(ConfigError, match=re.escape("bad.json is not valid JSON (line 1")):
        _resolve(ds=bad)
    with pytest.raises(ConfigError, match=re.escape("top level")):
        _resolve(ds=_write(tmp_path, "[1, 2]", "list.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_shipped_config_resolves(path: Path, precision: str):
    ds = _resolve(f"precision={precision}", "train.grad_accum=2", ds=path)
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["zero_optimization"]["stage"] == int(path.stem[4])
    assert ("offload" in path.stem) == ("offload_optimizer" in ds["zero_optimization"])


def test_shipped_set_is_complete():
    assert {p.name for p in SHIPPED} >= {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json",
                                         "zero3_offload.json"}


@pytest.mark.parametrize(("body", "needle"), [
    ({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}},
     "train_micro_batch_size_per_gpu=3 but train.micro_batch_size gives 4"),
    ('{"zero_optimization": ', "is not valid JSON"),
])
def test_cli_exits_2_with_one_line(tiny_data: Path, tmp_path: Path, body, needle):
    """Through the real command: fails in plan_run, before any process group, and writes nothing."""
    path = _write(tmp_path, body)
    r = train(tiny_overrides(tiny_data, tmp_path / "run"), nproc=1, check=False, extra_args=["--ds", str(path)],
              timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: backend.deepspeed.config") and needle in r.stderr
    assert not (tmp_path / "run").exists()
