"""The recipes in examples/ run as documented (no download): a HuggingFace causal LM on text tokenised
by a BPE that `scaletrain prepare` trains. The digits classification recipe runs in test_byo.py."""

from __future__ import annotations

import json
import math
import sys

import pytest
from helpers import REPO, child_env, losses, read_metrics, run_cmd, train

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_hf_llama_on_a_trained_bpe_trains_under_fsdp(tmp_path):
    """The factory returns LlamaForCausalLM as it is; FSDP shards its _no_split_modules (decoder layers)."""
    data = tmp_path / "bpe"
    run_cmd([sys.executable, "-m", "scaletrain.cli", "prepare", "--train-tokenizer", "512", "--max-bytes", "300000",
             "--out", str(data)], check=True, timeout=240)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and (data / "tokenizer.json").is_file()
    run = tmp_path / "run"
    train(["--config", str(REPO / "examples" / "hf_causal_lm.toml"), f"data.path={data}", f"run.out_dir={run}",
           "backend=fsdp", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
           "train.max_steps=8", "train.micro_batch_size=4", "train.eval_every=0", "train.eval_steps=2",
           "train.log_every=1", "schedule.warmup_steps=2", "optim.lr=3e-3", "checkpoint.every=0",
           "logging.console=false"], env=child_env(PYTHONPATH=str(REPO / "examples")), timeout=240)
    steps = losses(run)
    assert len(steps) == 8 and all(math.isfinite(v) for v in steps.values())
    assert steps[8] < steps[1]
    assert math.isclose(steps[1], math.log(512), rel_tol=0.1)  # starts near uniform over the BPE vocabulary
    last = read_metrics(run)[-1]
    assert math.isfinite(last["val_loss"])
