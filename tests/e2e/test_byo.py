"""Bring your own model and data: HF models as they are, data.factory datasets, user losses and
metrics, and the exact global-batch loss when micro-batches count different numbers of items."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, losses, read_metrics, run_cmd, train, train_cmd

pytest.importorskip("transformers")

TESTS = REPO / "tests"
EXAMPLES = REPO / "examples"


def _env(*paths: Path) -> dict:
    return child_env(PYTHONPATH=":".join(map(str, paths)))


def _varlen(out: Path, **extra) -> list[str]:
    base = {
        "run.out_dir": out, "data.factory": "byo:varlen_datasets", "model.factory": "byo:kwargs_gpt",
        "model.loss_fn": "byo:token_loss", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
        "model.block_size": 32, "train.micro_batch_size": 2, "train.max_steps": 1, "train.log_every": 1,
        "train.eval_every": 0, "train.eval_steps": 1, "schedule.warmup_steps": 0, "schedule.kind": "constant",
        "checkpoint.every": 0, "checkpoint.format": "full", "logging.console": False, "data.num_workers": 0,
        "optim.lr": 1e-2, "train.grad_clip": 0.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _full_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = run / "weights.safetensors"
    run_cmd([sys.executable, "-m", "scaletrain.cli", "consolidate", str(run / "ckpt"), "--out", str(out)],
            env=_env(TESTS), check=True, timeout=120)
    return load_file(out)


@pytest.fixture(scope="module")
def varlen_runs(tmp_path_factory) -> dict[str, Path]:
    """One optimizer step over one global batch of 8 variable-length sequences, two ways."""
    root = tmp_path_factory.mktemp("varlen")
    runs = {"1x4": (1, 8), "2x2": (2, 8)}
    out = {}
    for name, (nproc, global_batch) in runs.items():
        run = root / name
        train(_varlen(run, **{"train.global_batch_size": global_batch}), nproc=nproc, env=_env(TESTS), timeout=180)
        out[name] = run
    return out


def test_variable_counts_give_the_gradient_of_one_big_batch(varlen_runs):
    from scaletrain.config import load_config
    from scaletrain.data.sources import DatasetSource
    from scaletrain.data.tokens import BatchPlan
    from scaletrain.model.build import build_model
    from scaletrain.model.materialize import build_initialized
    from scaletrain.objective import Objective

    sys.path.insert(0, str(TESTS))
    import byo

    a, b = (read_metrics(varlen_runs[k])[0] for k in ("1x4", "2x2"))
    assert a["step"] == b["step"] == 1
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (a, b)
    wa, wb = _full_weights(varlen_runs["1x4"]), _full_weights(varlen_runs["2x2"])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7, msg=k)

    # The same batch by hand: the harness's loss is sum / count over all 8 sequences, which the mean of
    # the four micro-batch means is not (their counts differ).
    cfg = load_config(None, _varlen(varlen_runs["1x4"], **{"train.global_batch_size": 8}))
    train_ds, val_ds = byo.varlen_datasets()
    source = DatasetSource(train_ds, val_ds, plan=BatchPlan(2, 4, 1), rank=0, seed=cfg.run.seed, max_steps=1,
                           collate=None, pad_id=0, ignore_index=-100, num_workers=0, pin_memory=False)
    model = build_initialized(lambda: build_model(cfg.model, None), device=torch.device("cpu"), seed=cfg.run.seed)
    objective = Objective(loss_fn=byo.token_loss)
    sums, counts = [], []
    for mb in source.train_micro_batches(0):
        s, n = objective.loss(model(**mb), mb)
        sums.append(s)
        counts.append(float(n))
    assert len(set(counts)) > 1, counts  # the micro-batches really count different numbers of tokens
    exact = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts)) / len(sums)
    params = [p for p in model.parameters() if p.requires_grad]
    g_exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params, retain_graph=True)])
    g_mom = torch.cat([g.flatten() for g in torch.autograd.grad(mean_of_means, params)])
    assert math.isclose(a["loss"], float(exact), rel_tol=1e-5), (a["loss"], float(exact))
    assert math.isclose(a["grad_norm"], float(g_exact.norm()), rel_tol=1e-5), (a["grad_norm"], float(g_exact.norm()))
    # The mean of micro-batch means weights each token by 1/its micro-batch's count: another gradient.
    assert float((g_mom - g_exact).norm() / g_exact.norm()) > 1e-2


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("digits")
    config = str(EXAMPLES / "digits.toml")
    common = ["train.max_steps=20", "train.epochs=null", "train.eval_every=10", "train.global_batch_size=50",
              "logging.console=false", "schedule.warmup_steps=2"]
    env = _env(EXAMPLES)
    out = {name: root / name for name in ("full", "resumed", "one")}
    # Keys that the file sets and the command line changes: train.epochs off, max_steps on.
    train([*common, f"run.out_dir={out['full']}"], extra_args=["--config", config], env=env, timeout=180)
    train([*common, f"run.out_dir={out['resumed']}", "train.stop_at=10"], extra_args=["--config", config],
          env=env, timeout=180)
    train([*common, f"run.out_dir={out['resumed']}"], extra_args=["--config", config], env=env, timeout=180)
    train([*common, f"run.out_dir={out['one']}"], nproc=1, extra_args=["--config", config], env=env, timeout=180)
    return out


def test_digits_learns_and_resumes_bitwise(digits_runs):
    full = read_metrics(digits_runs["full"])
    evals = [r for r in full if "val_accuracy" in r]
    assert len(evals) == 2
    assert evals[-1]["val_accuracy"] > evals[0]["val_accuracy"] - 1e-9 and evals[-1]["val_accuracy"] > 0.5
    assert evals[-1]["val_loss"] < full[0]["loss"]
    steps = losses(digits_runs["full"])
    assert steps[20] < steps[1]
    assert losses(digits_runs["resumed"]) == steps  # 10 + resume + 10 == 20, bitwise
    resumed_evals = [r for r in read_metrics(digits_runs["resumed"]) if "val_accuracy" in r]
    assert resumed_evals[-1]["val_accuracy"] == evals[-1]["val_accuracy"]


def test_digits_one_process_matches_two(digits_runs):
    two, one = losses(digits_runs["full"]), losses(digits_runs["one"])
    assert two.keys() == one.keys()
    for step in two:
        assert math.isclose(two[step], one[step], rel_tol=1e-5), (step, two[step], one[step])
    # Every validation example counted exactly once, on 1 rank and on 2.
    v1 = [r["val_accuracy"] for r in read_metrics(digits_runs["one"]) if "val_accuracy" in r]
    v2 = [r["val_accuracy"] for r in read_metrics(digits_runs["full"]) if "val_accuracy" in r]
    assert v1 == pytest.approx(v2, rel=1e-6)
    n_val = 297
    assert all(round(v * n_val) == pytest.approx(v * n_val, abs=1e-6) for v in v2)


@pytest.mark.parametrize("overrides, needle", [
    ({"data.factory": "no_such_module:fn"}, "data.factory: cannot import module 'no_such_module'"),
    ({"data.factory": "byo:wrong_type_datasets"}, "data.factory: the train dataset (int) is not map-style"),
    ({"data.factory": "byo:string_examples"}, "data.factory: train[0] is a str"),
    ({"model.loss_fn": "byo:no_such_fn"}, "model.loss_fn: module 'byo' has no callable 'no_such_fn'"),
    ({"model.loss_fn": "byo:mean_loss_non_scalar"}, "model.loss_fn returned a tensor of shape"),
    ({"model.loss_fn": "null"}, "no loss: the model returned no `loss`"),
    ({"eval.metrics_fn": "byo:nothing"}, "eval.metrics_fn: module 'byo' has no callable 'nothing'"),
    ({"train.epochs": 2, "train.max_steps": 3}, "set train.max_steps or train.epochs, not both"),
])
def test_bad_hooks_exit_2_with_one_line(tmp_path, overrides, needle):
    args = _varlen(tmp_path / "run", **overrides)
    if "train.max_steps" not in overrides and "train.epochs" in overrides:
        args = [a for a in args if not a.startswith("train.max_steps")]
    result = run_cmd(train_cmd(args, nproc=1), env=_env(TESTS), timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-3000:]


def test_a_bad_loss_during_training_is_one_line_from_two_ranks(tmp_path):
    """Raised on every rank by the same check: printed once (torchrun itself then exits 1)."""
    args = _varlen(tmp_path / "run", **{"model.loss_fn": "byo:mean_loss_non_scalar"})
    result = run_cmd(train_cmd(args, nproc=2), env=_env(TESTS), timeout=120)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "model.loss_fn returned a tensor of shape" in lines[0], result.stderr[-3000:]
