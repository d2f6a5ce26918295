from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletrain.config import Config, build_config, config_to_toml, load_config, parse_overrides, valid_keys
from scaletrain.errors import ConfigError


def test_defaults_validate():
    cfg = Config()
    assert cfg.backend.kind == "ddp" and cfg.precision == "fp32"


def test_overrides_types_and_backend_shorthand():
    cfg = load_config(None, ["optim.lr=3e-4", "backend=FSDP", "backend.fsdp.sharding=hybrid_shard",
                             "optim.betas=[0.8,0.9]", "model.compile=true", "checkpoint.async=true"])
    assert cfg.optim.lr == 3e-4 and cfg.backend.kind == "fsdp"
    assert cfg.backend.fsdp.sharding == "hybrid_shard" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.compile is True and cfg.checkpoint.async_save is True


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("lr=1", "did you mean 'optim.lr'"),
        ("model.n_head=3", "divisible"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("backend=horovod", "must be one of"),
        ("train.max_steps=abc", "train.max_steps"),
        ("precision=fp8", "precision"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_input_is_one_line_config_error(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_grad_accum_and_global_batch_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["train.grad_accum=2", "train.global_batch_size=16"])


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
def test_config_files(tmp_path: Path, suffix: str):
    f = tmp_path / f"c{suffix}"
    if suffix == ".toml":
        f.write_text('backend = "fsdp"\n[optim]\nlr = 0.002\n')
    elif suffix == ".json":
        f.write_text(json.dumps({"backend": "fsdp", "optim": {"lr": 0.002}}))
    else:
        f.write_text("backend: fsdp\noptim:\n  lr: 0.002\n")
    cfg = load_config(f, ["optim.weight_decay=0.0"])
    assert cfg.backend.kind == "fsdp" and cfg.optim.lr == 0.002 and cfg.optim.weight_decay == 0.0


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_toml_round_trip(tmp_path: Path):
    cfg = load_config(None, ["backend=deepspeed", "backend.deepspeed.stage=3", "logging.trackers=[\"wandb\"]"])
    f = tmp_path / "round.toml"
    f.write_text(config_to_toml(cfg))
    assert load_config(f) == cfg


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


def test_config_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, scaletrain.config, scaletrain.checkpoint.layout, scaletrain.engines.ds_config; "
            "print('torch' in sys.modules or 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "False", out.stderr


def test_every_key_is_documented_or_section():
    assert "backend.fsdp.sharding" in valid_keys() and "checkpoint.async" in valid_keys()


def test_overrides_after_a_flag_without_value_stay_overrides():
    from scaletrain.cli import _flags_without_value, _overrides_last, build_parser

    parser = build_parser()
    argv = ["config", "show", "--json", "optim.lr=1e-3", "--config", "a.toml", "train.max_steps=30"]
    assert _overrides_last(argv, _flags_without_value(parser)) == [
        "config", "show", "--json", "--config", "a.toml", "optim.lr=1e-3", "train.max_steps=30"]
    # An option that takes a value keeps the token after it as its value.
    assert _overrides_last(["train", "--ds", "x=y.json", "a=1"], _flags_without_value(parser)) == [
        "train", "--ds", "x=y.json", "a=1"]


def test_defaults_the_user_did_not_set_never_fail_a_run():
    """Leftover 1: the default warmup (20) fits a 5-step run, and the default min_lr (1e-4) gives way to
    a smaller optim.lr; the same values set by hand are still one-line errors naming both keys."""
    short = load_config(None, ["train.max_steps=5"])
    assert short.schedule.warmup_steps == 5
    assert load_config(None, ["train.max_steps=500"]).schedule.warmup_steps == 20  # unchanged where it fit
    assert load_config(None, ["schedule.kind=constant", "optim.lr=1e-9"]).schedule.min_lr == 1e-4  # not read
    assert load_config(None, ["optim.lr=1e-5"]).schedule.min_lr == 1e-5
    assert load_config(None, ["optim.lr=3e-4"]).schedule.min_lr == 1e-4
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps \(10\) exceeds train\.max_steps \(5\)"):
        load_config(None, ["train.max_steps=5", "schedule.warmup_steps=10"])
    with pytest.raises(ConfigError, match=r"schedule\.min_lr \(0\.0001\) exceeds optim\.lr"):
        load_config(None, ["optim.lr=1e-5", "schedule.min_lr=1e-4"])
    # The fitted values are what config show prints and what a resume reads back: they validate again.
    assert build_config(short.to_json_dict()).schedule.warmup_steps == 5
