"""FLOPs per token against a hand count, the peak table's name matching, and MFU absent on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from scaletrain.config import ModelConfig
from scaletrain.model.gpt import GPT
from scaletrain.train import flops


def test_builtin_gpt_flops_per_token_by_hand():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False), vocab_size=64)
    d, L, V, T = 32, 2, 64, 16
    # per block: ln_1 and ln_2 gains, qkv (d x 3d), attn proj (d x d), fc (d x 4d), mlp proj (4d x d)
    block = 2 * d + 3 * d * d + d * d + 4 * d * d + 4 * d * d
    n = L * block + d + V * d  # + ln_f gain + the tied wte/lm_head (a real matmul); wpe excluded
    assert flops.matmul_params(model) == n == 26_784
    assert flops.flops_per_token(model, T) == 6 * n + 12 * L * d * T == 172_992


def test_hf_style_config_and_hook():
    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=8)
            self.embed_tokens = nn.Embedding(10, 8)  # untied: a lookup, not counted
            self.layer = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)

    n = 8 * 8 + 8 + 8 * 10
    assert flops.flops_per_token(HFLike(), 4) == 6 * n + 12 * 3 * 8 * 4

    class Own(nn.Module):
        def flops_per_token(self, seq_len: int) -> float:
            return 1000.0 + seq_len

    assert flops.flops_per_token(Own(), 7) == 1007.0
    assert flops.flops_per_token(nn.Linear(3, 3), 7) is None  # unknown shape: no guess


@pytest.mark.parametrize("name, precision, tf32, want", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.0),
    ("NVIDIA H100 PCIe", "bf16", True, 756.0),
    ("NVIDIA H200", "fp32", True, 494.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
    ("NVIDIA A100 80GB PCIe", "fp16", True, 312.0),
    ("NVIDIA L4", "bf16", True, 121.0),
    ("NVIDIA A10", "bf16", True, 125.0),
    ("NVIDIA A10G", "bf16", True, None),  # not the A10's figure
    ("NVIDIA L40S", "bf16", True, 362.0),
    ("Tesla V100-SXM2-16GB", "fp16", True, 125.0),
    ("NVIDIA GeForce RTX 4090", "bf16", True, 165.2),
    ("Some Future GPU", "bf16", True, None),
])
def test_peak_table_lookup(name, precision, tf32, want):
    assert flops.peak_for_name(name, precision, allow_tf32=tf32) == want


def test_peak_uses_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.device_peak_tflops(torch.device("cuda", 0), "bf16") == 989.0


def test_cpu_has_no_peak_and_no_mfu():
    assert flops.device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert flops.device_peak_tflops(torch.device("cpu"), "bf16", override=50.0) == 50.0
    meter = flops.MFUMeter(1e9, None, 1)
    record = {"tokens_per_s": 1000.0}
    meter.add_to(record)
    assert "mfu" not in record


def test_mfu_fraction():
    # 4 devices at 100 TFLOP/s; 2e5 tokens/s x 6e8 FLOPs/token = 1.2e14 FLOP/s -> 0.3
    assert flops.mfu(2e5, 6e8, 100.0, 4) == pytest.approx(0.3)
    meter = flops.MFUMeter(6e8, 100.0, 4)
    record = {"tokens_per_s": 2e5}
    meter.add_to(record)
    assert record["mfu"] == pytest.approx(0.3)
