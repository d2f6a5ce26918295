"""Model FLOPs utilisation (MFU): training FLOPs per token, device peak TFLOP/s, and their ratio.

FLOPs per token (forward + backward, the PaLM paper's appendix B formula, as nanoGPT uses it):

    6 * N + 12 * n_layer * n_embd * seq_len

N counts the parameters that take part in a matrix product: every distinct parameter except
embedding tables used only for lookups (an `nn.Embedding` weight counts when an `nn.Linear` shares
it, as the built-in GPT's tied `wte`/`lm_head` does, since the output projection is a real matmul).
The second term is the attention scores and weighted values (QK^T and AV) over the full `seq_len`,
causal mask or not. Recomputation (activation checkpointing) is not counted: MFU, not HFU.

Which model gets which count (`flops_per_token`):
  1. a model method `flops_per_token(seq_len) -> float` wins (the hook for any other architecture);
  2. a model with `n_layer` and `blocks` (the built-in GPT) or an HF-style `config` with
     num_hidden_layers/hidden_size (or n_layer/n_embd) gets the formula above;
  3. anything else: None, and no MFU is logged (never a guess).

Peak TFLOP/s: dense (no sparsity) vendor figures per device, by `torch.cuda.get_device_name()`, for
the precision the matmuls run in: bf16/fp16, tf32 (fp32 with `train.allow_tf32`) or plain fp32.
`logging.peak_tflops` overrides the table; on a CPU or an unlisted device there is no peak and MFU
is None. Imports: torch.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

# Dense peak TFLOP/s per device: (bf16/fp16 tensor cores, tf32 tensor cores, fp32 without tensor
# cores), from the vendors' data sheets. More specific names first: the first pattern that matches a
# whole word of the device name wins ("A10" does not match "A10G").
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("B200", (2250.0, 1100.0, 80.0)),
    ("H200", (989.0, 494.0, 67.0)),
    ("GH200", (989.0, 494.0, 67.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.0, 67.0)),  # SXM
    ("H800", (989.0, 494.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("A6000", (155.0, 77.4, 38.7)),  # RTX A6000
    ("V100", (125.0, 15.7, 15.7)),  # no bf16 nor tf32: the first column is fp16
    ("T4", (65.0, 8.1, 8.1)),
    ("RTX 4090", (165.2, 82.6, 82.6)),  # fp16/bf16 with fp32 accumulation
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("MI300X", (1307.0, 653.7, 163.4)),
    ("MI250X", (383.0, 95.7, 95.7)),
)


def peak_for_name(device_name: str, precision: str, *, allow_tf32: bool = True) -> float | None:
    """Peak dense TFLOP/s of the device called `device_name` for matmuls in `precision`
    ("bf16" | "fp16" | "fp32"; fp32 uses the tf32 column when `allow_tf32`), or None if unlisted."""
    for pattern, (half, tf32, fp32) in PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if allow_tf32 else fp32
    return None


def device_peak_tflops(device: torch.device, precision: str, *, allow_tf32: bool = True,
                       override: float | None = None) -> float | None:
    """`override` (logging.peak_tflops) when given; else the table's figure for this CUDA device; else
    None (CPU, or a device the table does not list). Local; call once at start-up."""
    if override is not None:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device), precision, allow_tf32=allow_tf32)


def matmul_params(model: nn.Module) -> int:
    """N of the formula: distinct parameters (global sizes, also when sharded), minus lookup-only
    embedding tables."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookup_only = {id(m.weight) for m in model.modules()
                   if isinstance(m, nn.Embedding) and id(m.weight) not in linear_weights}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in lookup_only:
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions keep their full size there
    return total


def _shape(model: nn.Module) -> tuple[int, int] | None:
    """(n_layer, width) of the built-in GPT or an HF decoder config, else None."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        if layers and width:
            return int(layers), int(width)
    blocks = getattr(model, "blocks", None)
    wpe = getattr(model, "wpe", None)
    if getattr(model, "n_layer", None) and blocks is not None and isinstance(wpe, nn.Embedding):
        return int(model.n_layer), int(wpe.embedding_dim)
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token for sequences of `seq_len` tokens (see the module docstring), or None
    when the model is neither the built-in GPT, nor HF-style, nor has a `flops_per_token` method.
    Pass the engine's unwrapped `module`."""
    hook = getattr(model, "flops_per_token", None)
    if callable(hook):
        value = hook(seq_len)
        return None if value is None else float(value)
    shape = _shape(model)
    if shape is None:
        return None
    n_layer, width = shape
    return 6.0 * matmul_params(model) + 12.0 * n_layer * width * seq_len


def mfu(tokens_per_s: float, flops_per_token: float | None, peak_tflops: float | None,
        world_size: int) -> float | None:
    """Achieved over peak FLOP/s as a fraction: global tokens/s x FLOPs per token over the peak of
    all `world_size` devices. None when either the FLOPs or the peak is unknown."""
    if flops_per_token is None or peak_tflops is None or peak_tflops <= 0 or world_size <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * world_size)


class MFUMeter:
    """What the loop holds: built once after the engine, then adds `mfu` to records with a rate.

        meter = flops.MFUMeter.for_run(engine.module, cfg.model.block_size, ctx.device, cfg.precision,
                                       allow_tf32=cfg.train.allow_tf32, override=cfg.logging.peak_tflops,
                                       world_size=ctx.world_size)
        ...
        record.update(speed.report()); meter.add_to(record)   # each log step

    Local; no collectives."""

    def __init__(self, flops_per_token: float | None, peak_tflops: float | None, world_size: int) -> None:
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size

    @classmethod
    def for_run(cls, model: nn.Module, seq_len: int, device: torch.device, precision: str, *,
                allow_tf32: bool = True, override: float | None = None, world_size: int = 1) -> MFUMeter:
        return cls(flops_per_token(model, seq_len),
                   device_peak_tflops(device, precision, allow_tf32=allow_tf32, override=override), world_size)

    def add_to(self, record: dict[str, Any]) -> None:
        """Sets record["mfu"] when the record has `tokens_per_s` and both FLOPs and peak are known."""
        if record.get("tokens_per_s") is None:
            return
        value = mfu(record["tokens_per_s"], self.flops_per_token, self.peak_tflops, self.world_size)
        if value is not None:
            record["mfu"] = value
