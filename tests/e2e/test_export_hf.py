"""`scaletrain consolidate --format hf` and `model.init_from=<folder>`, as a user meets them.

Claims held here:
  * the built-in GPT exports to its documented folder (config.json with `model_type: scaletrain-gpt`,
    model.safetensors) and `model.init_from` reads that folder back with identical weights;
  * a Hugging Face GPT-2 (`model.factory=hf_models:gpt2`) trained on 2 processes under DDP, FSDP and
    ZeRO-3 exports to a folder `GPT2LMHeadModel.from_pretrained` loads, whose validation loss equals the
    run's last logged `val_loss` (fp32, 1e-5);
  * a tiny `--max-shard-size` gives shards plus `model.safetensors.index.json`, which load too;
  * a run started with `model.init_from=<HF folder>` (written by `save_pretrained`, lm_head left out
    because tied) starts from exactly those weights;
  * bad inputs (a factory that does not import, a factory that is not a HF model, --out inside the
    checkpoint, a folder without weights) exit 2 with one line and write nothing.

Trained runs are shared through a module-scoped cache; each is 3 steps of a tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, read_metrics, run_cmd, tiny_overrides, train

# The factories live in tests/; children also need this checkout's src/ ahead of any installed copy.
PYTHONPATH = os.pathsep.join(p for p in (str(REPO / "tests"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
ENV = child_env(PYTHONPATH=PYTHONPATH)
HF = {"model.factory": "hf_models:gpt2", "model.dropout": 0.1}  # HF GPT-2's own default dropout
RUNS = {  # name -> overrides of a 3-step run that evaluates (2 batches per rank) at its last step
    "gpt": {},
    "hf-ddp": {**HF},
    "hf-fsdp": {**HF, "backend": "fsdp"},
    "hf-zero3": {**HF, "backend": "deepspeed", "backend.deepspeed.stage": 3},
}


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> the run folder of RUNS[name], trained once per module."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            run = tmp_path_factory.mktemp(name) / "run"
            train(tiny_overrides(tiny_data, run, **{"train.max_steps": 3, **RUNS[name]}), env=ENV, timeout=300)
            cache[name] = run
        return cache[name]

    return get


def consolidate(*args: object, env: dict | None = None):
    return run_cmd([sys.executable, "-m", "scaletrain.cli", "consolidate", *map(str, args)], timeout=180,
                   env=env or ENV)


def output(r) -> str:
    return r.stdout + r.stderr


def one_line_error(r) -> str:
    """The CLI's error line: exit 2, no traceback; returns the line."""
    assert r.returncode == 2, output(r)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines, output(r)
    return lines[-1]


def last_val_loss(run: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]


def _batches(run: Path):
    from scaletrain.config import load_config, resolve_grad_accum
    from scaletrain.data.format import read_meta
    from scaletrain.data.tokens import Batches, BatchPlan

    cfg = load_config(run / "config.json", [])
    meta = read_meta(cfg.data.path)
    plan = BatchPlan(cfg.train.micro_batch_size, resolve_grad_accum(cfg.train, 2), 2)
    return cfg, meta, [Batches(cfg.data.path, meta, block_size=cfg.model.block_size, plan=plan, rank=r,
                               seed=cfg.run.seed) for r in range(2)]


@torch.no_grad()
def val_loss(forward: Callable[[torch.Tensor], torch.Tensor], run: Path) -> float:
    """The loop's evaluation in one process: both ranks' validation batches, the summed fp32
    next-token cross entropy over the count of tokens."""
    from scaletrain.objective import lm_loss_sum

    cfg, _, ranks = _batches(run)
    total, count = 0.0, 0
    for batches in ranks:
        for i in range(cfg.train.eval_steps):
            x, y = batches.val_batch(i)
            total += float(lm_loss_sum(forward(x), y))
            count += y.numel()
    return total / count


@torch.no_grad()
def first_step_loss(forward: Callable[[torch.Tensor], torch.Tensor], run: Path) -> float:
    """The loss the loop logs for step 1: the global batch's summed token loss over its token count."""
    from scaletrain.objective import lm_loss_sum

    _, _, ranks = _batches(run)
    total, count = 0.0, 0
    for batches in ranks:
        for x, y in batches.train_micro_batches(0):
            total += float(lm_loss_sum(forward(x), y))
            count += y.numel()
    return total / count


def safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def near_zero_lr_run(tiny_data: Path, out: Path, init_from: Path, **extra: object) -> Path:
    """One step at lr=1e-12 from `init_from`, evaluated after it: the logged losses are those of the
    starting weights (they move by ~1e-12)."""
    train(tiny_overrides(tiny_data, out, **{"train.max_steps": 1, "optim.lr": 1e-12, "schedule.warmup_steps": 0,
                                            "schedule.min_lr": 0.0, "model.init_from": init_from, **extra}),
          env=ENV, timeout=300)
    return out


# ------------------------------------------------------------------------------------------- built-in GPT


def test_builtin_gpt_exports_and_init_from_reads_the_folder(trained, tiny_data: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from scaletrain.config import load_config
    from scaletrain.model.build import build_model
    from scaletrain.model.materialize import build_initialized

    run = trained("gpt")
    out = tmp_path / "export"
    r = consolidate(run / "ckpt", "--format", "hf", "--out", out)
    assert r.returncode == 0, output(r)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    cfg = load_config(run / "config.json", [])
    vocab = json.loads((run / "ckpt" / "step_00000003" / "meta.json").read_text())["model"]["vocab_size"]
    assert config == {"model_type": "scaletrain-gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                      "dropout": 0.0, "bias": False, "vocab_size": vocab, "dtype": "float32"}
    assert "lm_head.weight" not in safetensors_keys(out / "model.safetensors")  # tied: stored once

    # init_from=<folder>: every parameter, the tied head included, is the file's tensor exactly.
    stored = load_file(str(out / "model.safetensors"))
    model = build_initialized(lambda: build_model(cfg.model, vocab), device=torch.device("cpu"), seed=7, source=out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored["wte.weight" if name == "lm_head.weight" else name]), name
    assert model.lm_head.weight is model.wte.weight
    assert val_loss(model, run) == pytest.approx(last_val_loss(run), rel=1e-5, abs=1e-6)

    # ... and through a run: plan_run accepts the folder and the run starts from those weights.
    new = near_zero_lr_run(tiny_data, tmp_path / "new", out)
    assert last_val_loss(new) == pytest.approx(last_val_loss(run), rel=1e-5, abs=1e-6)


def test_builtin_gpt_sharded_export_loads_through_the_index(trained, tmp_path: Path):
    from scaletrain.config import load_config
    from scaletrain.model.build import build_model
    from scaletrain.model.materialize import build_initialized

    run = trained("gpt")
    out = tmp_path / "shards"
    r = consolidate(run / "ckpt", "--format", "hf", "--max-shard-size", "20KB", "--out", out)
    assert r.returncode == 0, output(r)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists() and (out / "config.json").is_file()
    cfg = load_config(run / "config.json", [])
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    model = build_initialized(lambda: build_model(cfg.model, vocab), device=torch.device("cpu"), seed=7, source=out)
    assert val_loss(model, run) == pytest.approx(last_val_loss(run), rel=1e-5, abs=1e-6)
    # Again into the same folder: refused without --force, replaced (stale shards removed) with it.
    r = consolidate(run / "ckpt", "--format", "hf", "--out", out)
    assert "--force" in one_line_error(r)
    r = consolidate(run / "ckpt", "--format", "hf", "--out", out, "--force")
    assert r.returncode == 0, output(r)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------------- HF GPT-2


@pytest.mark.parametrize("name", ["hf-ddp", "hf-fsdp", "hf-zero3"])
def test_hf_gpt2_export_loads_with_from_pretrained(trained, tmp_path: Path, name: str):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    run = trained(name)
    out = tmp_path / "hf"
    r = consolidate(run / "ckpt", "--format", "hf", "--out", out)
    assert r.returncode == 0, output(r)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    keys = safetensors_keys(out / "model.safetensors")
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # HF's own names, tied once
    model = GPT2LMHeadModel.from_pretrained(out)
    assert model.dtype == torch.float32 and model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    model.eval()
    assert val_loss(lambda x: model(x).logits, run) == pytest.approx(last_val_loss(run), rel=1e-5, abs=1e-6)
    if name == "hf-ddp":  # the Auto class finds the architecture from config.json
        auto = AutoModelForCausalLM.from_pretrained(out)
        assert type(auto) is GPT2LMHeadModel


def test_hf_sharded_export_writes_an_index_and_loads(trained, tmp_path: Path):
    from transformers import GPT2LMHeadModel

    run = trained("hf-ddp")
    out = tmp_path / "hf-shards"
    r = consolidate(run / "ckpt", "--format", "hf", "--max-shard-size", "20KB", "--out", out)
    assert r.returncode == 0, output(r)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert "lm_head.weight" not in index["weight_map"]
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    assert val_loss(lambda x: model(x).logits, run) == pytest.approx(last_val_loss(run), rel=1e-5, abs=1e-6)


def test_init_from_an_hf_folder_starts_from_exactly_its_weights(tiny_data: Path, tmp_path: Path):
    import hf_models
    from transformers import GPT2LMHeadModel

    from scaletrain.config import ModelConfig
    from scaletrain.data.format import read_meta
    from scaletrain.model.materialize import build_initialized

    # A local HF checkpoint as save_pretrained writes it (lm_head.weight left out: tied to wte).
    vocab = read_meta(tiny_data).vocab_size
    cfg = ModelConfig(block_size=32, factory="hf_models:gpt2")
    torch.manual_seed(11)
    source = hf_models.gpt2(cfg, vocab).eval()
    folder = tmp_path / "hf-source"
    source.save_pretrained(folder)
    assert "lm_head.weight" not in safetensors_keys(folder / "model.safetensors")

    model = build_initialized(lambda: hf_models.gpt2(cfg, vocab), device=torch.device("cpu"), seed=3, source=folder)
    expected = source.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert model.lm_head.weight is model.transformer.wte.weight

    run = near_zero_lr_run(tiny_data, tmp_path / "run", folder, **{**HF, "model.dropout": 0.0})  # step 1 vs eval
    loaded = GPT2LMHeadModel.from_pretrained(folder).eval()
    forward = lambda x: loaded(x).logits  # noqa: E731
    step1 = next(r["loss"] for r in read_metrics(run) if r.get("step") == 1 and "loss" in r)
    assert step1 == pytest.approx(first_step_loss(forward, run), rel=1e-5, abs=1e-6)
    assert last_val_loss(run) == pytest.approx(val_loss(forward, run), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------- bad inputs


def _tag_with_factory(run: Path, dest: Path, factory: str) -> Path:
    """A copy of the run's last tag whose meta.json names another model.factory."""
    tag = dest / "ckpt" / "step_00000003"
    shutil.copytree(run / "ckpt" / "step_00000003", tag)
    meta = json.loads((tag / "meta.json").read_text())
    meta["config"]["model"]["factory"] = factory
    (tag / "meta.json").write_text(json.dumps(meta))
    return tag


@pytest.mark.parametrize(("factory", "words"), [
    ("no_such_module:gpt2", ["model.factory", "no_such_module", "PYTHONPATH"]),
    ("hf_models:not_hf", ["model.factory", "--format safetensors"]),
])
def test_hf_export_of_a_factory_that_cannot_be_exported(trained, tmp_path: Path, factory: str, words: list[str]):
    tag = _tag_with_factory(trained("gpt"), tmp_path / "copy", factory)
    out = tmp_path / "out"
    line = one_line_error(consolidate(tag, "--format", "hf", "--out", out))
    assert line.count("consolidate --format hf") == 1 and all(w in line for w in words), line
    assert not out.exists()


def test_hf_export_out_inside_the_checkpoint_is_refused(trained, tmp_path: Path):
    run = trained("gpt")
    tag = run / "ckpt" / "step_00000003"
    before = sorted(p.name for p in tag.iterdir())
    line = one_line_error(consolidate(run / "ckpt", "--format", "hf", "--out", tag / "hf"))
    assert "--out" in line and "overlaps the checkpoint" in line
    assert sorted(p.name for p in tag.iterdir()) == before


def test_init_from_a_folder_without_weights_is_refused(tiny_data: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(tiny_overrides(tiny_data, tmp_path / "run", **{"model.init_from": empty}), nproc=1, check=False)
    line = one_line_error(r)
    assert "model.init_from" in line and "model.safetensors" in line


@pytest.mark.parametrize("case", ["index-escapes", "not-safetensors"])
def test_hostile_weights_folder_is_refused_in_one_line(tmp_path: Path, case: str):
    """A folder from elsewhere: an index naming a shard outside the folder, or a model.safetensors
    that is no such file. Refused by the reader every rank opens, in one line, nothing read."""
    from scaletrain.errors import CheckpointError
    from scaletrain.model.materialize import WeightsSource, check_weights_source

    folder = tmp_path / "hf"
    folder.mkdir()
    if case == "index-escapes":
        (tmp_path / "outside.safetensors").write_bytes(b"\0" * 16)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    else:
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    check_weights_source(folder)  # the folder has the expected file names: the reader judges the contents
    with pytest.raises(CheckpointError) as e:
        WeightsSource(folder)
    assert "\n" not in str(e.value) and "model.init_from" in str(e.value)


def test_hf_gpt2_as_is_trains_alike_on_ddp_fsdp_and_zero3(trained):
    """GPT-2 returned as it is, with dropout 0.1: the RNG is reseeded after the model is built, so every
    backend draws the same masks (building on meta or under zero.Init draws nothing); losses agree."""
    from helpers import losses

    ddp = losses(trained("hf-ddp"))
    assert len(ddp) == 3
    for name in ("hf-fsdp", "hf-zero3"):
        other = losses(trained(name))
        for step, value in ddp.items():
            assert other[step] == pytest.approx(value, rel=1e-5), (name, step)
