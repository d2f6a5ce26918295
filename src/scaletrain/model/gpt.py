"""The built-in GPT decoder, and loading a user's model from "pkg.module:function".

The model contract every engine relies on (docs/models.md):
  * `forward(input_ids: LongTensor[B, T]) -> Tensor[B, T, vocab]` returns logits; the harness
    computes the loss, so precision and loss averaging are the same for every model;
  * parameters are created on the CPU (or the meta device) in fp32; engines move and cast them;
  * the attribute `block_classes` (optional) names the module classes that FSDP shards one by one
    and activation checkpointing wraps; `backend.fsdp.wrap_classes` overrides it.
Knows nothing of engines. Imports: torch, `scaletrain.config`.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.config import ModelConfig

log = logging.getLogger(__name__)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with q, k and v fused in one matrix, laid out head by head.

    The rows of `qkv.weight` are grouped per head, `[q_h, k_h, v_h]` for h = 0..n_head-1 (Megatron's
    layout), so a contiguous row shard holds whole heads with their own q, k and v. Tensor parallel
    can then split the fused matrix column-wise across ranks and each rank attends over its heads
    alone; the number of heads a rank holds is read from the output width, not from the config.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)  # all heads, or this rank's under tensor parallel
        # (B, T, heads, 3, head_dim) -> three (B, heads, T, head_dim)
        q, k, v = qkv.view(b, t, heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    block_classes = (Block,)
    # Tensor-parallel plan (backend.tp_size > 1): module name patterns -> "colwise" | "rowwise".
    # Column-parallel outputs stay local (heads / hidden units of this rank); each row-parallel
    # layer ends with one all-reduce, so a block costs two all-reduces in forward.
    tp_plan: ClassVar[dict[str, str]] = {
        "blocks.*.attn.qkv": "colwise",
        "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.fc": "colwise",
        "blocks.*.mlp.proj": "rowwise",
    }

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        # Tied: one matrix. state_dict() lists it as both wte.weight and lm_head.weight.
        self.lm_head.weight = self.wte.weight
        self.reset_parameters(cfg.n_layer)

    def reset_parameters(self, n_layer: int) -> None:
        """GPT-2 init from the global RNG (a plain construction); the harness uses `init_parameter`."""
        self.n_layer = n_layer
        for name, p in self.named_parameters():
            self.init_parameter(name, p.data)

    def init_parameter(self, name: str, tensor: torch.Tensor) -> None:
        """Fill the full tensor of parameter `name` in place: N(0, 0.02) for matrices, residual output
        projections scaled by 1/sqrt(2 * n_layer), biases zero, norm gains one (GPT-2's init). The
        harness calls it under an RNG seeded from (seed, name) (`scaletrain.model.materialize`)."""
        if tensor.dim() >= 2:
            std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(tensor, mean=0.0, std=std)
        elif name.endswith(".bias"):
            nn.init.zeros_(tensor)
        else:
            nn.init.ones_(tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds model.block_size={self.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
