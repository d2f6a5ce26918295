"""Hugging Face models for the `model.factory` export tests (importable as `hf_models:...` from tests/).

Built from configs only (nothing is downloaded) and returned as they are: the harness keeps their
own parameter names, so an export loads with `from_pretrained`.
"""

from __future__ import annotations


def gpt2_config(cfg, vocab_size):
    from transformers import GPT2Config

    # Dropout follows model.dropout (0 by default) so runs are deterministic; no special tokens, so the
    # config is valid for a vocabulary smaller than GPT-2's.
    return GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=cfg.block_size, vocab_size=vocab_size,
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      bos_token_id=None, eos_token_id=None)


def gpt2(cfg, vocab_size):
    """A 2-layer GPT-2 (tied lm_head = transformer.wte)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(cfg, vocab_size))


def not_hf(cfg, vocab_size):
    """A plain torch model: it has no Hugging Face config to export."""
    from models import TinyLM

    return TinyLM(vocab_size)
