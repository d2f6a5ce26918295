from __future__ import annotations

import pytest
import torch

from scaletrain.config import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.model.build import block_classes, build_model, count_params
from scaletrain.model.gpt import GPT, Block


def test_gpt_shapes_init_and_tying():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)
    m = GPT(cfg, vocab_size=32)
    assert m(torch.randint(0, 32, (3, 8))).shape == (3, 8, 32)
    assert m.lm_head.weight is m.wte.weight
    assert count_params(m) == sum(p.numel() for p in m.parameters())
    assert abs(float(m.blocks[0].mlp.fc.weight.std()) - 0.02) < 0.005
    assert float(m.blocks[0].mlp.proj.weight.std()) < 0.015  # residual projections scaled down
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))
    assert block_classes(m) == (Block,)


def test_user_factory_contract():
    m = build_model(ModelConfig(factory="models:tiny_lm"), vocab_size=20)
    assert m(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 20)
    assert [c.__name__ for c in block_classes(m, ("TinyBlock",))] == ["TinyBlock"]
    with pytest.raises(ConfigError, match="match no module"):
        block_classes(m, ("Nope",))


@pytest.mark.parametrize(("spec", "needle"), [("models:not_a_module", "not an nn.Module"),
                                                ("no_such_mod:f", "cannot import"), ("models:missing", "no callable")])
def test_bad_factories(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model(ModelConfig(factory=spec), vocab_size=20)


def test_hf_models_take_their_blocks_from_no_split_modules():
    transformers = pytest.importorskip("transformers")
    from scaletrain.engines.parallel import model_blocks
    from scaletrain.model.build import block_classes

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    assert [c.__name__ for c in block_classes(model)] == ["LlamaDecoderLayer"]
    assert len(model_blocks(model)) == 3
