"""Per-layer gradient norms agree across layouts: FSDP2, tensor parallel and ZeRO-2/3 report what
DDP reports for the same step (2 gloo processes), their squares add up to the global grad norm the
step then reports, and the largest layer is named the same everywhere."""

from __future__ import annotations

import pytest
from helpers import spawn

SPECS = ["ddp", "fsdp:full_shard", "tp:2", "deepspeed:2", "deepspeed:3"]  # ZeRO-1 reads the same fragments as 2
BASE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "train.micro_batch_size=2",
        "train.grad_clip=0.5", "optim.lr=1e-2", "train.grad_accum=2"]
VOCAB = 64


def _norms(rank: int, world: int, specs: list[str]) -> dict:
    import torch

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.engines import registry
    from scaletrain.engines.base import EngineSpec
    from scaletrain.model.build import build_model
    from scaletrain.optim import build_adamw

    ctx = dist.init(dist.current_launch(), timeout_s=120)
    out: dict = {}
    try:
        for spec_name in specs:
            cfg = load_config(None, [*BASE, *(f"{k}={v}" for k, v in registry.spec_overrides(spec_name).items())])
            registry.validate(cfg, world)
            tp = cfg.backend.tp_size
            spec = EngineSpec(ctx=ctx, precision="fp32", grad_accum=2, grad_clip=cfg.train.grad_clip,
                              micro_batch_size=2, seed=cfg.run.seed,
                              model_factory=lambda cfg=cfg: build_model(cfg.model, VOCAB),
                              optimizer_factory=lambda m, cfg=cfg: build_adamw(m, cfg.optim, device_type="cpu"))
            torch.manual_seed(cfg.run.seed)
            engine = registry.build_engine(spec, cfg)
            from scaletrain.objective import TokenBatch, lm_loss_sum

            for micro in range(2):  # two micro-batches: the norms must see the accumulated gradient
                def rows(r: int, micro=micro):
                    return torch.randint(VOCAB, (2, 17), generator=torch.Generator().manual_seed(10 * micro + r))

                x = torch.cat([rows(0), rows(1)]) if tp > 1 else rows(rank)
                with engine.accumulate(is_boundary=micro == 1):
                    y = x[:, 1:]
                    engine.backward(lm_loss_sum(engine.forward(TokenBatch(x[:, :-1], y)), y) / y.numel())
            layers = engine.layer_grad_norms()
            stats = engine.step(1e-2)
            out[spec_name] = {"layers": layers, "global": stats.grad_norm}
            engine.close()
            del engine
    finally:
        dist.teardown()
    return out


@pytest.fixture(scope="module")
def norms() -> list[dict]:
    return spawn(_norms, args=(SPECS,), timeout=300)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("spec", SPECS)
def test_layer_norms_match_ddp(norms: list[dict], spec: str):
    from scaletrain.train.metrics import layer_norm_record

    rank0, rank1 = norms
    ref, got = rank0["ddp"]["layers"], rank0[spec]["layers"]
    assert list(ref) == ["wte", "wpe", "blocks.0", "blocks.1", "ln_f"]
    assert list(got) == list(ref), got
    rel = 1e-4 if spec.startswith("tp") else 1e-5
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-7), (spec, key, got, ref)
    assert rank1[spec]["layers"] == got  # every rank has the same numbers (one all-reduce)
    total = sum(v * v for v in got.values()) ** 0.5
    assert total == pytest.approx(rank0[spec]["global"], rel=rel)  # every element counted once
    record = layer_norm_record(got)
    assert record["grad_norm_max_layer"] == max(ref, key=ref.get)
    assert record[f"grad_norm/{record['grad_norm_max_layer']}"] == max(got.values())


def test_layer_key():
    from scaletrain.engines.grads import layer_key

    assert layer_key("blocks.3.attn.qkv.weight") == "blocks.3"
    assert layer_key("_orig_mod.module.blocks.10.mlp.fc.bias") == "blocks.10"
    assert layer_key("model.layers.0.self_attn.q_proj.weight") == "model.layers.0"
    assert layer_key("model.norm.weight") == "model.norm"
    assert layer_key("wte.weight") == "wte" and layer_key("scale") == "scale"
