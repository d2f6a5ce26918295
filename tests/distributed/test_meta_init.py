"""Models larger than one rank's memory: built on `meta`, sharded, then materialised piece by piece,
with initial values that are a function of (seed, parameter name) alone, so every backend and world
size starts from the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import spawn

from scaletrain.config import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.model.gpt import GPT
from scaletrain.model.materialize import build_initialized, build_on_meta, init_value, materialize

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
VOCAB = 64


def gpt() -> nn.Module:
    return GPT(CFG, VOCAB)


def test_meta_build_allocates_no_parameter_and_keeps_ties():
    model = build_on_meta(gpt)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight
    built = build_initialized(gpt, device=torch.device("cpu"), seed=3)
    assert built.lm_head.weight is built.wte.weight and not built.wte.weight.is_meta


def test_values_depend_on_seed_and_name_only():
    model = build_on_meta(gpt)
    a = init_value(model, "blocks.0.mlp.fc.weight", torch.Size([128, 32]), torch.float32, seed=1)
    torch.manual_seed(12345)  # the global RNG plays no part
    assert torch.equal(a, init_value(model, "blocks.0.mlp.fc.weight", torch.Size([128, 32]), torch.float32, seed=1))
    assert not torch.equal(a, init_value(model, "blocks.1.mlp.fc.weight", torch.Size([128, 32]), torch.float32, seed=1))
    assert not torch.equal(a, init_value(model, "blocks.0.mlp.fc.weight", torch.Size([128, 32]), torch.float32, seed=2))


def test_gpt_init_statistics():
    m = build_initialized(lambda: GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=16), VOCAB),
                          device=torch.device("cpu"), seed=0)
    assert abs(float(m.blocks[0].mlp.fc.weight.std()) - 0.02) < 0.002
    assert abs(float(m.blocks[0].mlp.proj.weight.std()) - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert torch.equal(m.blocks[0].ln_1.weight, torch.ones(128))


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))


class _NoHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Opaque()


def test_a_model_without_an_init_hook_gets_one_line():
    with pytest.raises(ConfigError, match=r"_NoHooks cannot be initialised on the meta device \(inner.w belongs to "
                                          r"_Opaque, which has no reset_parameters\); define init_parameter"):
        build_initialized(_NoHooks, device=torch.device("cpu"), seed=0)


def test_hf_llama_on_meta_has_its_rope_buffer_and_the_same_values():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    factory = lambda: transformers.LlamaForCausalLM(config)  # noqa: E731
    plain = factory()
    meta = build_initialized(factory, device=torch.device("cpu"), seed=5)
    inv = dict(meta.named_buffers(remove_duplicate=False))
    ref = dict(plain.named_buffers(remove_duplicate=False))
    assert any("inv_freq" in n for n in inv)
    for name, buf in ref.items():
        torch.testing.assert_close(inv[name], buf, msg=name)  # non-persistent RoPE table survived to_empty
    with torch.no_grad():  # the plain model given the same (seed, name) values computes the same logits
        for name, p in plain.named_parameters():
            p.copy_(init_value(meta, name, p.shape, p.dtype, seed=5))
    x = torch.randint(VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    out = meta(x).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain(x).logits, rtol=0, atol=0)


def _sharded_full_weights(rank: int, world: int, source: str | None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from scaletrain import dist

    dist.init(dist.current_launch(), timeout_s=60)
    try:
        model = build_on_meta(gpt)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = {n: p.to_local().shape for n, p in model.named_parameters()}
        materialize(model, device=torch.device("cpu"), seed=7, source=Path(source) if source else None)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"local": {k: tuple(v) for k, v in local.items()},
                "full": {k: v.numpy() for k, v in full.items()} if rank == 0 else {}}
    finally:
        dist.teardown()


def test_fsdp_meta_materialise_equals_the_one_process_build(tmp_path: Path):
    want = build_initialized(gpt, device=torch.device("cpu"), seed=7).state_dict()
    results = spawn(_sharded_full_weights, args=(None,), timeout=120)
    assert results[0]["local"]["blocks.0.mlp.fc.weight"] == (64, 32)  # each rank materialised half
    got = results[0]["full"]
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(torch.from_numpy(got[k]), v), k


def test_fsdp_meta_materialise_from_a_weights_file(tmp_path: Path):
    from safetensors.torch import save_file

    src = GPT(CFG, VOCAB)  # different values from the seeded init
    state = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, str(tmp_path / "w.safetensors"))
    results = spawn(_sharded_full_weights, args=(str(tmp_path / "w.safetensors"),), timeout=120)
    for k, v in src.state_dict().items():
        assert torch.equal(torch.from_numpy(results[0]["full"][k]), v), k
