"""One contract, every registered backend: the same checks run against each engine the registry can
build (DDP, the four FSDP strategies, tensor parallel, ZeRO-1/2/3), on one 2-process gloo group.

1. Two steps from the same seed on the same global batch: loss and grad norm within 1e-5 relative of
   DDP's (1e-4 for tensor parallel, which changes the summation order inside each matrix product).
2. save -> load into a freshly built engine -> step is bitwise equal to stepping without saving: the
   loss, the grad norm and every weight afterwards.
Each engine is built through `registry.build_engine` from a config, exactly as the loop builds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import spawn

SPECS = ["ddp", "fsdp:full_shard", "fsdp:shard_grad_op", "fsdp:hybrid_shard", "fsdp:no_shard", "tp:2",
         "deepspeed:1", "deepspeed:2", "deepspeed:3"]
BASE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "train.micro_batch_size=2",
        "train.grad_clip=0.5", "optim.lr=1e-2"]
VOCAB = 64


def _batch(step: int, rank: int, tp: int):
    """This rank's micro-batch of `step`: rank-specific data, except that tensor-parallel ranks see the
    whole global batch (they hold one model replica together)."""
    import torch

    def rows(r: int):
        return torch.randint(VOCAB, (2, 17), generator=torch.Generator().manual_seed(1000 * step + r))

    x = torch.cat([rows(0), rows(1)]) if tp > 1 else rows(rank)
    return x[:, :-1], x[:, 1:]


def _step(engine, step: int, rank: int, tp: int) -> tuple[float, float]:
    from scaletrain import dist
    from scaletrain.objective import TokenBatch, lm_loss_sum

    x, y = _batch(step, rank, tp)
    with engine.accumulate(is_boundary=True):
        loss = lm_loss_sum(engine.forward(TokenBatch(x, y)), y) / y.numel()
        engine.backward(loss)
    stats = engine.step(1e-2)
    mean_loss = dist.all_reduce_sum([float(loss)], engine.ctx.device)[0] / engine.ctx.world_size
    return mean_loss, stats.grad_norm


def _contract(rank: int, world: int, specs: list[str], tmp: str) -> dict:
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
            overrides = [f"{k}={v}" for k, v in registry.spec_overrides(spec_name).items()]
            cfg = load_config(None, [*BASE, *overrides])
            registry.validate(cfg, world)
            tp = cfg.backend.tp_size

            def build(cfg=cfg):
                spec = EngineSpec(ctx=ctx, precision="fp32", grad_accum=1, grad_clip=cfg.train.grad_clip,
                                  micro_batch_size=2, seed=cfg.run.seed,
                                  model_factory=lambda: build_model(cfg.model, VOCAB),
                                  optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type="cpu"))
                torch.manual_seed(cfg.run.seed)
                return registry.build_engine(spec, cfg)

            engine = build()
            first = [_step(engine, s, rank, tp) for s in range(2)]
            path = Path(tmp) / spec_name.replace(":", "_")
            if rank == 0:
                path.mkdir(parents=True)
            dist.barrier()
            engine.save_checkpoint(path, {"marker": spec_name})
            engine.wait_for_save()
            dist.barrier()
            third = _step(engine, 2, rank, tp)
            weights = engine.full_state_dict()
            engine.close()
            del engine
            resumed = build()
            client = resumed.load_checkpoint(path, {"world_size": world, "backend": spec_name})
            third_resumed = _step(resumed, 2, rank, tp)
            weights_resumed = resumed.full_state_dict()
            resumed.close()
            del resumed
            same = sorted(weights) == sorted(weights_resumed) and all(
                torch.equal(weights[k], weights_resumed[k]) for k in weights)
            out[spec_name] = {"first": first, "third": third, "third_resumed": third_resumed,
                              "weights_equal": same, "client": client.get("marker")}
    finally:
        dist.teardown()
    return out


@pytest.fixture(scope="module")
def contract(tmp_path_factory) -> dict:
    rank0, _ = spawn(_contract, args=(SPECS, str(tmp_path_factory.mktemp("contract"))), timeout=420)
    return rank0


@pytest.mark.parametrize("spec", SPECS)
def test_two_steps_match_ddp(contract: dict, spec: str):
    rel = 1e-4 if spec.startswith("tp") else 1e-5
    for (loss, norm), (ref_loss, ref_norm) in zip(contract[spec]["first"], contract["ddp"]["first"], strict=True):
        assert loss == pytest.approx(ref_loss, rel=rel) and norm == pytest.approx(ref_norm, rel=rel), (spec, contract[spec])


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_step_is_bitwise_equal_to_not_saving(contract: dict, spec: str):
    got = contract[spec]
    assert got["client"] == spec  # the client state came back
    assert got["third_resumed"] == got["third"], got
    assert got["weights_equal"], spec
