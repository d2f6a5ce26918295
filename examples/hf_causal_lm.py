"""A HuggingFace causal language model built from a config (no download), trained on text tokenised
with a BPE tokenizer that `scaletrain prepare` trains. The model is returned as it is: the harness
reads `logits` from its output, shards its `_no_split_modules` blocks under FSDP, and keeps its own
parameter names, so `scaletrain consolidate --format hf` writes a folder `from_pretrained` loads.

From the repository root:

    scaletrain prepare --train-tokenizer 4096 --out data/bpe          # the built-in corpus, BPE 4096
    PYTHONPATH=examples torchrun --standalone --nproc_per_node=2 launch/train.py \\
        --config examples/hf_causal_lm.toml run.out_dir=runs/hf-llama backend=fsdp
"""

from __future__ import annotations


def model(cfg, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
