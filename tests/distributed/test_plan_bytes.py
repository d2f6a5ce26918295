"""`plan_memory`'s model state equals what live engines hold, byte for byte, on 2 gloo ranks.

Each engine is built through `registry.build_engine` as the loop builds it, takes one step (so AdamW
state exists) and one more forward/backward on the accumulation boundary (so gradients sit where the
engine keeps them between backward and step). Then every tensor this rank holds is counted by its
storage, each storage once (views into DeepSpeed's flat buffers are not counted twice):

  params     the module's parameters (local shard of a DTensor), ZeRO-1/2's flat parameter groups,
             ZeRO-3's partitions (`ds_tensor`)
  grads      `.grad` of every parameter, ZeRO-1/2's partitioned gradients (`averaged_gradients`,
             `grads_in_partition`), ZeRO-3's flat gradient partition
  optimizer  every optimizer state tensor plus ZeRO's fp32 partition of the parameters

The model is sized so that ZeRO-3 partitions some parameters and keeps others whole (the 1e4
persistence threshold), its vocabulary is odd so FSDP pads, and it has biases so ZeRO-1/2 partitions
split parameters unevenly between ranks.
"""

from __future__ import annotations

import pytest
from helpers import spawn

SPECS = ["ddp", "fsdp:full_shard", "fsdp:shard_grad_op", "tp:2", "deepspeed:1", "deepspeed:2", "deepspeed:3"]
BASE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=16", "model.bias=true",
        "train.micro_batch_size=2"]
VOCAB = 67


def _storages(tensors) -> dict[int, int]:
    import torch
    from torch.distributed.tensor import DTensor

    out = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _flat(values):
    for v in values:
        yield from (v if isinstance(v, (list, tuple)) else [v])


def live_model_state(engine) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds, each storage once."""
    params = list({id(p): p for p in engine.module.parameters()}.values())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    p = _storages(params)
    g = _storages(x.grad for x in params)
    o = _storages(v for state in inner.state.values() for v in state.values())
    stage = getattr(engine, "stage", None)
    if stage == 3:
        p.update(_storages(x.ds_tensor for x in params))
        g.update(_storages([opt.grad_partitions_flat_buffer]))
        master = _storages(opt.fp32_partitioned_groups_flat)
    elif stage in (1, 2):
        p.update(_storages(opt.bit16_groups_flat))
        g.update(_storages(_flat(v for v in opt.averaged_gradients.values() if v is not None)))
        g.update(_storages([getattr(opt, "grads_in_partition", None)]))
        master = _storages(opt.single_partition_of_fp32_groups)
    else:
        master = {}
    o.update({k: v for k, v in master.items() if k not in p})  # a master that is the parameter is not extra
    return {"params": sum(p.values()), "grads": sum(g.values()), "optimizer": sum(o.values())}


def _measure(rank: int, world: int, specs: list[str]) -> dict:
    import torch

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.engines import registry
    from scaletrain.engines.base import EngineSpec
    from scaletrain.model.build import build_model
    from scaletrain.objective import TokenBatch, lm_loss_sum
    from scaletrain.optim import build_adamw

    ctx = dist.init(dist.current_launch(), timeout_s=120)
    out = {}
    try:
        for name in specs:
            cfg = load_config(None, [*BASE, *(f"{k}={v}" for k, v in registry.spec_overrides(name).items())])
            spec = EngineSpec(ctx=ctx, precision="fp32", grad_accum=1, grad_clip=1.0, micro_batch_size=2, seed=0,
                              model_factory=lambda cfg=cfg: build_model(cfg.model, VOCAB),
                              optimizer_factory=lambda m, cfg=cfg: build_adamw(m, cfg.optim, device_type="cpu"))
            engine = registry.build_engine(spec, cfg)
            x = torch.randint(VOCAB, (2, 17), generator=torch.Generator().manual_seed(rank))

            def forward_backward(engine=engine, x=x):
                with engine.accumulate(is_boundary=True):
                    engine.backward(lm_loss_sum(engine.forward(TokenBatch(x[:, :-1], x[:, 1:])), x[:, 1:]) / 32)

            forward_backward()
            engine.step(1e-3)
            forward_backward()
            out[name] = live_model_state(engine)
            engine.close()
            del engine
    finally:
        dist.teardown()
    return out


@pytest.fixture(scope="module")
def live() -> list[dict]:
    return spawn(_measure, args=(SPECS,), timeout=240)


@pytest.mark.parametrize("spec", SPECS)
def test_plan_model_state_equals_live_bytes(live: list[dict], spec: str):
    from scaletrain.config import load_config
    from scaletrain.engines.plan import plan_memory

    cfg = load_config(None, BASE)
    for rank, got in enumerate(live):
        e = plan_memory(cfg, 2, spec, rank=rank, vocab_size=VOCAB)
        assert {"params": e.params, "grads": e.grads, "optimizer": e.optimizer} == got[spec], (spec, rank)
    worst = plan_memory(cfg, 2, spec, vocab_size=VOCAB)
    assert worst.model_state == max(sum(r[spec].values()) for r in live)
