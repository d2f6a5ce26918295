"""Cross-backend resume, in process on 2 ranks: every backend's step-2 state (DDP, FSDP, tensor parallel,
ZeRO-1/2/3) loaded into every backend, AdamW `exp_avg`, `exp_avg_sq` and `step` compared per parameter
bitwise with the state the writing engine held (both gathered to full tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import spawn

pytestmark = pytest.mark.timeout(900)

SPECS = ("ddp", "fsdp", "tp:2", "deepspeed:1", "deepspeed:2", "deepspeed:3")
VOCAB = 64


def gather_full(engine: Any) -> dict[str, dict[str, Any]]:
    """Collective. {canonical name: {param, exp_avg, exp_avg_sq: full fp32 CPU tensors, step: float}}
    of any engine, every rank the same, each parameter once (tied names under the first)."""
    import torch
    from torch.distributed.tensor import DTensor

    from scaletrain.checkpoint.portable import _distinct_params

    def full(t: Any) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()

    out: dict[str, dict[str, Any]] = {}
    ds = getattr(engine, "_ds", None)
    if ds is not None and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter's moment fragments once, after the first group's first step,
        # when the other groups have no state yet: link again now that every group has its state.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for names, p in _distinct_params(engine.module):
        if ds is None:
            state = engine.optimizer.state[p]
            out[names[0]] = {"param": full(p), "exp_avg": full(state["exp_avg"]),
                             "exp_avg_sq": full(state["exp_avg_sq"]), "step": float(state["step"])}
        else:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            shape = tuple(getattr(p, "ds_shape", p.shape))
            rec = {"param": safe_get_full_fp32_param(p).float().cpu().reshape(shape).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                rec[key] = safe_get_full_optimizer_state(p, key).float().cpu().reshape(shape).clone()
            base = engine.optimizer.optimizer
            step = next(iter(base.state.values()))["step"]
            rec["step"] = float(step)
            out[names[0]] = rec
    return out


def build(spec: str, ctx: Any) -> Any:
    from scaletrain.config import load_config
    from scaletrain.engines.base import EngineSpec
    from scaletrain.engines.registry import build_engine, spec_overrides
    from scaletrain.model.build import build_model
    from scaletrain.optim import build_adamw

    over = [f"{k}={v}" for k, v in spec_overrides(spec).items()]
    cfg = load_config(None, [*over, "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8",
                             "train.micro_batch_size=2"])
    es = EngineSpec(ctx=ctx, precision="fp32", grad_accum=1, grad_clip=1.0, micro_batch_size=2, seed=0,
                    model_factory=lambda: build_model(cfg.model, VOCAB),
                    optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type="cpu"))
    return build_engine(es, cfg)


def train_two_steps(engine: Any, salt: int) -> None:
    import torch
    import torch.nn.functional as F

    for step in range(2):
        g = torch.Generator().manual_seed(1000 * salt + step)  # the same batch on every rank
        x = torch.randint(0, VOCAB, (2, 8), generator=g)
        y = torch.randint(0, VOCAB, (2, 8), generator=g)
        with engine.accumulate(is_boundary=True):
            logits = engine.forward(x)
            engine.backward(F.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1)))
        engine.step(1e-2)


def _matrix(rank: int, world: int, root: str) -> dict[str, list[str]]:
    import torch

    from scaletrain import dist

    ctx = dist.init(dist.current_launch(), timeout_s=300)
    engines, saved, problems = {}, {}, []
    try:
        for i, spec in enumerate(SPECS):
            torch.manual_seed(0)
            engine = build(spec, ctx)
            train_two_steps(engine, salt=i)  # each backend its own data: every state differs from the others
            tag = Path(root) / spec.replace(":", "-")
            if rank == 0:
                tag.mkdir(parents=True)
            dist.barrier()
            engine.save_checkpoint(tag, {"step": 2, "source": spec})
            engine.wait_for_save()
            dist.barrier()
            engines[spec], saved[spec] = engine, (tag, gather_full(engine))
        for target, engine in engines.items():
            for source, (tag, want) in saved.items():
                client = engine.load_checkpoint(tag, {"backend_spec": source, "world_size": world, "own_run": True})
                if client.get("source") != source:
                    problems.append(f"{source} -> {target}: client state {client}")
                got = gather_full(engine)
                for name, rec in want.items():
                    for key, value in rec.items():
                        other = got[name][key]
                        same = other == value if key == "step" else torch.equal(other, value)
                        if not same:
                            problems.append(f"{source} -> {target}: {name} {key} differs")
        for engine in engines.values():
            engine.close()
    finally:
        dist.teardown()
    return {"problems": problems}


def test_every_backend_loads_every_other_bitwise(tmp_path: Path):
    results = spawn(_matrix, args=(str(tmp_path),), timeout=800)
    for rank, r in enumerate(results):
        assert not r["problems"], f"rank {rank}: {len(r['problems'])} mismatches, first: {r['problems'][:5]}"
