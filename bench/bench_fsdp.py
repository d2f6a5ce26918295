"""Per-rank model-state memory and step time: FSDP2 FULL_SHARD against DDP, on the same GPT.

    python bench/bench_fsdp.py [--world 2] [--n-layer 4] [--n-embd 256] [--rounds 7] [--steps 5]

Spawns `--world` gloo processes on the CPU (nccl and the GPU when CUDA is visible). Every rank
builds both engines from the same seed through the Engine interface the loop uses, then:

memory  after a warm-up step (so AdamW state exists) and one more forward/backward (so gradients
        exist), counts the bytes this rank holds of parameters, gradients and optimizer state,
        walking local shards (`DTensor.to_local()`) and every optimizer state tensor. Printed beside
        the ZeRO formula: fp32 AdamW holds 4P params + 4P grads + 8P moments = 16P bytes per rank
        under DDP, and 16P/N when all three are fully sharded over N ranks.
time    interleaves rounds (DDP steps, then FSDP steps) so load on the machine hits both alike,
        and reports the median over rounds of FSDP step time / DDP step time.

Ratios are the result; absolute times depend on the machine and its load. Imports: scaletrain.
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

TARGET_RATIO = 0.55  # FSDP per-rank model states / DDP's, for N = 2 (ideal 0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes(t: Any) -> int:
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def model_state_bytes(engine: Any) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards only)."""
    params = list({id(p): p for p in engine.module.parameters()}.values())
    optim = sum(_bytes(v) for state in engine.optimizer.state.values() for v in state.values())
    return {
        "params": sum(_bytes(p) for p in params),
        "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optim": optim,
    }


def _build(kind: str, args: argparse.Namespace, ctx: Any) -> Any:
    import torch

    from scaletrain.config import ModelConfig, OptimConfig
    from scaletrain.engines.backends.ddp import DDPConfig
    from scaletrain.engines.backends.fsdp import FSDPConfig
    from scaletrain.engines.base import EngineSpec
    from scaletrain.model.build import build_model
    from scaletrain.optim import build_adamw

    mcfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    spec = EngineSpec(
        ctx=ctx, precision="fp32", grad_accum=1, grad_clip=1.0, micro_batch_size=args.micro_batch_size,
        model_factory=lambda: build_model(mcfg, args.vocab_size),
        optimizer_factory=lambda m: build_adamw(m, OptimConfig(), device_type=ctx.device_type),
        seed=0,
    )
    torch.manual_seed(0)
    from scaletrain.engines.torch_native import TorchNativeEngine

    if kind == "ddp":
        return TorchNativeEngine(spec, ddp=DDPConfig())
    return TorchNativeEngine(spec, fsdp=FSDPConfig(sharding="full_shard"))


def _loss(engine: Any, batch: tuple) -> Any:
    from scaletrain.objective import TokenBatch, lm_loss_sum

    x, y = batch
    return lm_loss_sum(engine.forward(TokenBatch(x, y)), y) / y.numel()


def _train_steps(engine: Any, batch: tuple, n: int) -> float:
    """Collective. Seconds per optimizer step over n steps."""
    from scaletrain import dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(n):
        with engine.accumulate(is_boundary=True):
            engine.backward(_loss(engine, batch))
        engine.step(1e-4)
    dist.barrier()
    return (time.perf_counter() - start) / n


def _measure(rank: int, world: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from scaletrain import dist

    launch = dist.LaunchInfo("env", rank, rank, world, world, "127.0.0.1", port)
    ctx = dist.init(launch, timeout_s=300)
    try:
        engines = {kind: _build(kind, args, ctx) for kind in ("ddp", "fsdp")}
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randint(args.vocab_size, (args.micro_batch_size, args.block_size + 1), generator=gen)
        batch = (x[:, :-1], x[:, 1:])
        out: dict[str, Any] = {"params": sum(p.numel() for p in engines["ddp"].module.parameters())}
        for kind, engine in engines.items():
            _train_steps(engine, batch, 1)  # warm-up: optimizer state exists from here on
            with engine.accumulate(is_boundary=True):
                engine.backward(_loss(engine, batch))
            out[kind] = model_state_bytes(engine)
            engine.step(1e-4)
        times: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        for _ in range(args.rounds):
            for kind, engine in engines.items():
                times[kind].append(_train_steps(engine, batch, args.steps))
        out["times"] = times
        for engine in engines.values():
            engine.close()
        return out
    finally:
        dist.teardown()


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        queue.put((rank, True, _measure(rank, world, port, args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
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
                raise SystemExit(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(args.world)]


def summarise(results: list[dict[str, Any]], world: int) -> dict[str, Any]:
    p = results[0]["params"]
    mib = 2**20
    per_rank = {kind: max(sum(r[kind].values()) for r in results) for kind in ("ddp", "fsdp")}
    ratios = [f / d for f, d in zip(results[0]["times"]["fsdp"], results[0]["times"]["ddp"], strict=True)]
    summary = {
        "world": world, "params": p,
        "ddp_bytes_per_rank": per_rank["ddp"], "fsdp_bytes_per_rank": per_rank["fsdp"],
        "formula_ddp_bytes": 16 * p, "formula_fsdp_bytes": 16 * p // world,
        "memory_ratio": per_rank["fsdp"] / per_rank["ddp"],
        "ddp_step_ms_median": 1e3 * statistics.median(results[0]["times"]["ddp"]),
        "fsdp_step_ms_median": 1e3 * statistics.median(results[0]["times"]["fsdp"]),
        "step_time_ratio_median": statistics.median(ratios),
        "step_time_ratio_rounds": [round(r, 3) for r in ratios],
    }
    print(f"GPT with {p:,} parameters, fp32 AdamW, {world} ranks (largest rank shown)")
    print(f"{'':8}{'params':>10}{'grads':>10}{'optim':>10}{'total':>10}{'formula':>10}   MiB")
    for kind, formula in (("ddp", 16 * p), ("fsdp", 16 * p / world)):
        r = max(results, key=lambda r, k=kind: sum(r[k].values()))[kind]
        cells = [r["params"], r["grads"], r["optim"], sum(r.values()), formula]
        print(f"{kind:8}" + "".join(f"{c / mib:10.2f}" for c in cells))
    verdict = "ok" if summary["memory_ratio"] <= TARGET_RATIO else "ABOVE TARGET"
    print(f"memory  FSDP/DDP per rank = {summary['memory_ratio']:.3f} (target <= {TARGET_RATIO}, ideal "
          f"{1 / world:.3f}): {verdict}")
    print(f"time    FSDP/DDP step time, median of {len(ratios)} interleaved rounds = "
          f"{summary['step_time_ratio_median']:.2f} (DDP {summary['ddp_step_ms_median']:.1f} ms, "
          f"FSDP {summary['fsdp_step_ms_median']:.1f} ms per step)")
    print("json    " + json.dumps(summary))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per engine per round")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a hung rank fails the run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = summarise(run(args), args.world)
    return 0 if summary["memory_ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
