"""Per-rank model-state memory of ZeRO-1/2/3 beside the ZeRO paper's formulas, and step time against DDP.

    python bench/bench_zero.py [--world 2] [--n-layer 4] [--n-embd 128] [--steps 3] [--time-steps 10]

Spawns `--world` gloo processes on the CPU. Every rank builds each engine through the Engine interface
the loop uses (same seed, same GPT), then:

memory  bf16, as the paper's formulas assume mixed precision: after a few steps (so Adam state exists)
        and one more forward/backward (so gradients exist), count the bytes this rank holds of
        - low-precision parameters: the module's bf16 tensors (ZeRO-3: this rank's `ds_tensor` only),
        - low-precision gradients after one more forward/backward without a step: `param.grad` plus
          the partition in `averaged_gradients` (ZeRO-1, counted off the accumulation boundary,
          where it holds the full `.grad`; ZeRO-2, counted on the boundary, where only this rank's
          reduced partition is left), or the flat partition buffer (ZeRO-3),
        - fp32 master weights (this rank's flat partition) and Adam's two moments (its state tensors).
        Printed beside 2P+2P+12P/N (stage 1), 2P+(2P+12P)/N (stage 2) and 16P/N (stage 3). Buckets for
        communication are not model states and are left out (the paper leaves them out too).
time    fp32, interleaved rounds (DDP, then each stage) so load on the machine hits all alike; the
        median step time of each stage over DDP's.

ZeRO-3 runs with `stage3_param_persistence_threshold=0` so every parameter is partitioned, as the formula
assumes (DeepSpeed's default keeps parameters under 1e5 elements whole on every rank).
Imports: scaletrain, deepspeed (through the engine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any

TARGET = 1.15  # measured / formula, at most


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(args: argparse.Namespace, backend: str, stage: int, precision: str) -> list[str]:
    out = [f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}", f"model.n_embd={args.n_embd}",
           f"model.block_size={args.block_size}", f"train.micro_batch_size={args.micro_batch_size}",
           f"precision={precision}", f"backend={backend}"]
    return [*out, f"backend.deepspeed.stage={stage}"] if backend == "deepspeed" else out


def _build(args: argparse.Namespace, ctx: Any, backend: str, stage: int, precision: str) -> Any:
    import torch

    from scaletrain.config import load_config
    from scaletrain.engines.base import EngineSpec
    from scaletrain.engines.registry import build_engine
    from scaletrain.model.build import build_model
    from scaletrain.optim import build_adamw

    cfg = load_config(None, _overrides(args, backend, stage, precision))
    if backend == "deepspeed" and stage == 3:  # every parameter partitioned, as 16P/N assumes
        import scaletrain.engines.ds_config as dsc

        def resolve(hidden_size=None):
            resolved = dsc.resolve_ds_config(cfg, world_size=ctx.world_size, hidden_size=hidden_size)
            resolved["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return resolved

        from scaletrain.engines.deepspeed_zero import DeepSpeedEngine

        build = lambda spec: DeepSpeedEngine(spec, cfg.backend.deepspeed, resolve, cfg.optim)  # noqa: E731
    else:
        build = lambda spec: build_engine(spec, cfg)  # noqa: E731
    spec = EngineSpec(ctx=ctx, precision=cfg.precision, grad_accum=1, grad_clip=1.0,
                      micro_batch_size=args.micro_batch_size, model_factory=lambda: build_model(cfg.model, 256),
                      optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type="cpu"), seed=0)
    torch.manual_seed(0)
    return build(spec)


def _batch(args: argparse.Namespace, rank: int, step: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 256, (args.micro_batch_size, args.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _one_step(engine: Any, args: argparse.Namespace, rank: int, step: int, *, update: bool = True,
              boundary: bool = True) -> None:
    with engine.accumulate(is_boundary=boundary):
        from scaletrain.objective import TokenBatch, lm_loss_sum

        x, y = _batch(args, rank, step)
        engine.backward(lm_loss_sum(engine.forward(TokenBatch(x, y)), y) / y.numel())
    if update:
        engine.step(1e-4)


def _flat(items: Any) -> Any:
    for t in items:
        if isinstance(t, (list, tuple)):
            yield from _flat(t)
        else:
            yield t


def _nbytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in _flat(tensors):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _model_states(engine: Any) -> dict[str, int]:
    """Bytes this rank holds, by kind, with gradients of the last backward still in place."""
    zopt = engine.optimizer
    params = list({id(p): p for p in engine.module.parameters()}.values())
    if engine.stage == 3:
        lp = _nbytes(p.ds_tensor for p in params)
        grads = _nbytes([zopt.grad_partitions_flat_buffer])
        master = _nbytes(zopt.fp32_partitioned_groups_flat)
    else:
        lp = _nbytes(params)
        grads = _nbytes(p.grad for p in params) + _nbytes(zopt.averaged_gradients.values())
        master = _nbytes(zopt.single_partition_of_fp32_groups)
    moments = _nbytes(t for st in zopt.optimizer.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"lp_params": lp, "lp_grads": grads, "fp32_master": master, "moments": moments,
            "total": lp + grads + master + moments, "P": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def _memory(rank: int, args: argparse.Namespace, ctx: Any) -> dict[int, dict[str, int]]:
    out = {}
    for stage in (1, 2, 3):
        engine = _build(args, ctx, "deepspeed", stage, "bf16")
        for s in range(args.steps):
            _one_step(engine, args, rank, s)
        # One more forward/backward, no step, so gradients stay where DeepSpeed keeps them: stage 1
        # holds the full bf16 .grad while accumulating (off the boundary); stages 2 and 3 hold only
        # this rank's reduced partition once the boundary micro-step has reduced it.
        _one_step(engine, args, rank, args.steps, update=False, boundary=stage != 1)
        out[stage] = _model_states(engine)
        engine.close()
    return out


def _timing(rank: int, args: argparse.Namespace, ctx: Any) -> dict[str, list[float]]:
    from scaletrain import dist

    engines = {"ddp": _build(args, ctx, "ddp", 0, "fp32")}
    engines.update({f"zero{s}": _build(args, ctx, "deepspeed", s, "fp32") for s in (1, 2, 3)})
    times: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.rounds + 1):
        for name, engine in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            for s in range(args.time_steps):
                _one_step(engine, args, rank, s)
            dist.barrier()
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) / args.time_steps)
    return times


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        from scaletrain import dist

        ctx = dist.init(dist.current_launch(), timeout_s=600)
        try:
            result = {"memory": _memory(rank, args, ctx), "time": _timing(rank, args, ctx)}
        finally:
            dist.teardown()
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def _formula(stage: int, p: int, n: int) -> float:
    return {1: 2 * p + 2 * p + 12 * p / n, 2: 2 * p + (2 * p + 12 * p) / n, 3: 16 * p / n}[stage]


def report(results: list[dict], world: int) -> dict[str, Any]:
    rows = {}
    for stage in (1, 2, 3):
        worst = max(results, key=lambda r: r["memory"][stage]["total"])["memory"][stage]
        want = _formula(stage, worst["P"], world)
        rows[f"zero{stage}"] = {**worst, "formula": want, "ratio": worst["total"] / want}
    t = results[0]["time"]
    ddp = statistics.median(t["ddp"])
    for stage in (1, 2, 3):
        rows[f"zero{stage}"]["step_time_vs_ddp"] = statistics.median(t[f"zero{stage}"]) / ddp
    rows["ddp_step_ms"] = ddp * 1e3
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="bf16 steps before counting memory")
    ap.add_argument("--time-steps", type=int, default=10, help="fp32 steps per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue), daemon=True)
             for r in range(args.world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=args.timeout)
            if not ok:
                print(f"rank {rank} failed:\n{value}", file=sys.stderr)
                return 1
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    rows = report([results[r] for r in range(args.world)], args.world)
    print(f"{'':6} {'P':>9} {'lp params':>10} {'lp grads':>10} {'fp32 master':>12} {'moments':>10} "
          f"{'total':>10} {'formula':>10} {'ratio':>6} {'time/DDP':>9}")
    for stage in (1, 2, 3):
        r = rows[f"zero{stage}"]
        print(f"zero{stage:<2} {r['P']:>9,} {r['lp_params']:>10,} {r['lp_grads']:>10,} {r['fp32_master']:>12,} "
              f"{r['moments']:>10,} {r['total']:>10,} {r['formula']:>10,.0f} {r['ratio']:>6.3f} "
              f"{r['step_time_vs_ddp']:>9.2f}")
    print(f"DDP fp32 step: {rows['ddp_step_ms']:.1f} ms; world {args.world}; target ratio <= {TARGET}")
    print(json.dumps(rows))
    return 0 if all(rows[f"zero{s}"]["ratio"] <= TARGET for s in (1, 2, 3)) else 3


if __name__ == "__main__":
    sys.exit(main())
