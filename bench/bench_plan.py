"""`scaletrain plan`'s prediction against the memory a run really takes, per backend and model size.

    python bench/bench_plan.py [--sizes 20m 80m] [--backends ddp fsdp deepspeed:2 deepspeed:3] [--steps 3]

For each size and backend, 2 fresh gloo processes on the CPU (one process group per case, so no case
inherits another's heap) each: import torch, the harness and the engine's modules; initialise the
process group; read `VmRSS` (the baseline) and reset `VmHWM` to it (Linux: `5` into
/proc/self/clear_refs); build the engine through `registry.build_engine` as the loop does; run
`--steps` optimizer steps of one micro batch each (fp32, built-in GPT, byte vocabulary); read `VmHWM`.
The measured figure is the peak growth (VmHWM - baseline) of the rank that grew most; the prediction
is `plan_memory`'s device total (model state + buffers + activations) for the same config. On a CPU
every allocation is host memory, so RSS sees what a GPU's allocator would hold, except that pages a
buffer never touches are not resident, and glibc keeps freed blocks unless its mmap threshold is
fixed, which the workers do by default (`--default-malloc` turns that off; docs/benchmarks.md,
"Memory planner").

Sizes: `20m` is 6 layers x 512 (19.1 M parameters), `80m` 12 layers x 768 (85.4 M); block 256,
micro batch 2. Target: measured / predicted within 15 %. Imports: scaletrain (in the workers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import traceback
from typing import Any

TARGET = 0.15
SIZES = {"20m": {"model.n_layer": 6, "model.n_head": 8, "model.n_embd": 512},
         "80m": {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768}}
VOCAB = 256
# glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which freed
# buffers stay in the heap and in RSS. Fixing it makes every block >= 128 KiB its own mapping, returned
# on free, so RSS follows live bytes as a GPU caching allocator's "allocated" figure does.
MMAP_THRESHOLD = 128 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def overrides(size: str, spec: str, args: argparse.Namespace) -> list[str]:
    from scaletrain.engines.registry import spec_overrides

    base = {**SIZES[size], "model.block_size": args.block_size, "train.micro_batch_size": args.micro_batch_size,
            "precision": "fp32", **spec_overrides(spec)}
    return [f"{k}={v}" for k, v in base.items()]


def _measure(rank: int, size: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.engines import registry
    from scaletrain.engines.base import EngineSpec
    from scaletrain.model.build import build_model
    from scaletrain.objective import TokenBatch, lm_loss_sum
    from scaletrain.optim import build_adamw

    cfg = load_config(None, overrides(size, spec, args))
    if cfg.backend.kind == "deepspeed":
        import scaletrain.engines.deepspeed_zero  # its imports belong to the baseline
    else:
        import scaletrain.engines.torch_native  # noqa: F401
    ctx = dist.init(dist.current_launch(), timeout_s=900)
    try:
        spec_ = EngineSpec(ctx=ctx, precision="fp32", grad_accum=1, grad_clip=1.0,
                           micro_batch_size=args.micro_batch_size, seed=0,
                           model_factory=lambda: build_model(cfg.model, VOCAB),
                           optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type="cpu"))
        gen = torch.Generator().manual_seed(rank)
        batches = [torch.randint(VOCAB, (args.micro_batch_size, args.block_size + 1), generator=gen)
                   for _ in range(args.steps)]
        dist.barrier()
        baseline = _status("VmRSS")
        reset = _reset_peak()
        engine = registry.build_engine(spec_, cfg)
        phases = {"build": _status("VmHWM") - baseline}  # peak growth by the end of each phase
        for i, x in enumerate(batches):
            with engine.accumulate(is_boundary=True):
                loss = lm_loss_sum(engine.forward(TokenBatch(x[:, :-1], x[:, 1:])), x[:, 1:]) / x[:, 1:].numel()
                phases[f"forward{i}"] = _status("VmHWM") - baseline
                engine.backward(loss)
            del loss
            phases[f"backward{i}"] = _status("VmHWM") - baseline
            engine.step(1e-4)
            phases[f"step{i}"] = _status("VmHWM") - baseline
        peak = _status("VmHWM")
        engine.close()
        return {"baseline": baseline, "peak": peak, "growth": peak - baseline, "reset": reset, "phases": phases}
    finally:
        dist.teardown()


def _worker(rank: int, world: int, port: int, size: str, spec: str, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        queue.put((rank, True, _measure(rank, size, spec, args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    # DeepSpeed keeps communication threads alive: leave without finalisers once the result is queued.
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_case(size: str, spec: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if not args.default_malloc:  # spawned workers inherit it; glibc reads it at start-up
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, size, spec, args, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=args.timeout)
            if not ok:
                raise RuntimeError(f"{size} {spec}: rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(2)]


def predict(size: str, spec: str, args: argparse.Namespace) -> Any:
    from scaletrain.config import load_config
    from scaletrain.engines.plan import plan_memory

    return plan_memory(load_config(None, overrides(size, spec, args)), 2, spec, vocab_size=VOCAB, procs_per_node=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--backends", nargs="+", default=["ddp", "fsdp", "deepspeed:2", "deepspeed:3"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's dynamic mmap threshold on (freed buffers then stay resident)")
    ap.add_argument("--phases", action="store_true", help="also print the peak growth after build, each backward and each step")
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes:
        for spec in args.backends:
            e = predict(size, spec, args)
            ranks = run_case(size, spec, args)
            worst = max(ranks, key=lambda r: r["growth"])
            row = {"size": size, "spec": spec, "params": e.n_params, "model_state": e.model_state,
                   "buffers": e.buffers, "activations": e.activations, "predicted": e.total,
                   "measured": worst["growth"], "ratio": worst["growth"] / e.total,
                   "peak_reset": all(r["reset"] for r in ranks), "phases": worst["phases"]}
            rows.append(row)
            mb = 1e6
            print(f"{size:4s} {spec:12s} P {e.n_params / 1e6:5.1f} M | model state {e.model_state / mb:7.1f} MB "
                  f"buffers {e.buffers / mb:6.1f} activations {e.activations / mb:6.1f} | predicted "
                  f"{e.total / mb:7.1f} MB measured {worst['growth'] / mb:7.1f} MB | ratio {row['ratio']:.3f}"
                  f"{'' if row['peak_reset'] else ' (VmHWM not reset)'}", flush=True)
            if args.phases:
                print("     peak growth by phase (MB): " + ", ".join(
                    f"{k} {v / mb:.0f}" for k, v in worst["phases"].items()), flush=True)
    print(json.dumps(rows))
    allocator = "glibc default" if args.default_malloc else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    print(f"2 gloo processes, fp32, micro batch {args.micro_batch_size} x {args.block_size}, {args.steps} steps, "
          f"{allocator}; target |measured / predicted - 1| <= {TARGET}")
    return 0 if all(abs(r["ratio"] - 1) <= TARGET for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
