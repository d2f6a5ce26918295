"""Harness step time against a bare hand-written loop in a process of its own, per backend, and in the
same run each backend's peak memory against DDP's: speed and memory measured together.

Run on 2 CPU processes per side (the script starts them itself, one torchrun per side and pair):

    python bench/bench_overhead.py                                   # every backend, small GPT, + memory
    python bench/bench_overhead.py --backends ddp fsdp --pairs 9 --no-memory
    python bench/bench_overhead.py --backends ddp --sizes tiny       # fixed cost per step
    python bench/bench_overhead.py --backends deepspeed:3 --profile  # cProfile of rank 0's harness side

Speed. The two sides never share a process: the harness side runs what `scaletrain train` runs (its
`dist.init`, the run object `train.run.Run` with the configured engine, data sampling, schedule, step
body and metrics record through the sink), so a process-wide setting of the harness (the allocator,
threads, anything `dist.init` or the engine build changes) is paid on the harness side only. The bare
side is a loop written by hand in a process that imports no harness code except the built-in GPT class
and the resolved DeepSpeed JSON (plain data): `torch.distributed.init_process_group`, random offsets
into the memmap, AdamW with decay / no-decay groups, the lr set every step, fp32:
  ddp          DistributedDataParallel, cross entropy, backward, clip_grad_norm_, step, loss.item()
  fsdp         fully_shard per block then the root, the same body (clip_grad_norm_ on DTensors)
  deepspeed:N  deepspeed.initialize over the same resolved config the harness uses (minus its
               "optimizer"/"scheduler" sections, with a torch AdamW passed in), engine.backward(loss),
               engine.step(), loss.item()
The sides alternate by pair (A B, B A, ...), each process timing `--blocks` blocks of `--steps` steps
after `--warmup`, so that the machine's minute-to-minute drift hits both alike. The figure is the median
of the per-pair ratios harness/bare (each side's median block) with their range.

Memory. With `--memory` (the default) each backend then runs `bench_memory.py`'s run phase: the real
`scaletrain train` entry point on a GPT of `--memory-size` for one step and its final save, per-rank
peak RSS (VmHWM), reported as a ratio to DDP's peak measured in the same run (target <= 0.6 for the
sharded backends at the default 151 M model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

BACKENDS = ("ddp", "fsdp", "deepspeed:1", "deepspeed:2", "deepspeed:3")
SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, micro_batch_size)
    "small": (4, 4, 256, 128, 8),
    "tiny": (2, 2, 64, 64, 4),
}
MEMORY_SIZES = {"151m": (12, 16, 1024, 256), "19m": (6, 8, 512, 256)}  # n_layer, n_head, n_embd, block
DEFAULT_STEPS = {"small": 10, "tiny": 100}
TARGET = 1.03  # harness / bare, median of the pairs
MEMORY_TARGET = 0.6  # sharded backends' per-rank peak / DDP's


def _config(args: argparse.Namespace, out: Path):
    from scaletrain.config import load_config
    from scaletrain.engines.registry import spec_overrides

    n_layer, n_head, n_embd, block, micro = SIZES[args.size]
    return load_config(None, [
        *(f"{k}={v}" for k, v in spec_overrides(args.backend).items()), f"data.path={args.data}",
        f"run.out_dir={out}", f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
        f"model.block_size={block}", f"train.micro_batch_size={micro}", "precision=fp32",
        "train.max_steps=100000", "train.log_every=10", "logging.console=false", "schedule.warmup_steps=10",
        "optim.lr=1e-4", "schedule.min_lr=1e-5",
    ])


def _time_blocks(args: argparse.Namespace, steps, barrier) -> list[float]:
    """Seconds per step of each timed block, after the warm-up."""
    steps(args.warmup)
    times = []
    for _ in range(args.blocks):
        barrier()
        t0 = time.perf_counter()
        steps(args.steps)
        barrier()
        times.append((time.perf_counter() - t0) / args.steps)
    return times


def _harness_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The harness side: `scaletrain train`'s process set-up and its run object's per-step body."""
    from scaletrain import dist
    from scaletrain.train.plan import plan_run
    from scaletrain.train.run import Run

    out = Path(args.tmp) / f"harness-{args.backend.replace(':', '-')}-{args.size}-{args.pair}"
    cfg = _config(args, out)
    plan = plan_run(cfg, int(os.environ["WORLD_SIZE"]))
    ctx = dist.init(dist.current_launch(), timeout_s=args.timeout)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    run = Run(plan, ctx, [])

    def steps(n: int) -> None:
        for _ in range(n):
            step_out = run.step(votes=(False, False))
            record = run.log.record(run.state, step_out, is_last=False)
            run.callbacks.step_end(run.info, run.state, record)

    if args.profile:
        return _profile(args, ctx.is_main, steps, dist.barrier)
    times = _time_blocks(args, steps, dist.barrier)
    run.callbacks.train_end(run.info, run.state, None)
    run.close()
    dist.teardown()
    return {"times": times, "is_main": ctx.is_main}


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's groups: matrices decay, vectors (norm gains) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _cosine_lr(it: int, *, peak: float, floor: float, warmup: int, total: int) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine down to `floor`."""
    if it < warmup:
        return peak * (it + 1) / warmup
    progress = min((it - warmup) / max(total - 1 - warmup, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _wrap_bare(args: argparse.Namespace, cfg, raw, opt):
    """The model (and optimizer) as one wraps them by hand for args.backend."""
    kind = args.backend.partition(":")[0]
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(raw), opt
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in raw.blocks:
            fully_shard(blk)
        return fully_shard(raw), opt
    import deepspeed

    from scaletrain.engines.ds_config import resolve_ds_config

    ds_config = {k: v for k, v in resolve_ds_config(cfg, world_size=int(os.environ["WORLD_SIZE"]),
                                                    hidden_size=cfg.model.n_embd).items()
                 if k not in ("optimizer", "scheduler")}
    model, opt, _, _ = deepspeed.initialize(model=raw, optimizer=opt, config=ds_config, dist_init_required=False)
    return model, opt


def _bare_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The bare side: a hand-written loop on a plain process group (no harness process set-up)."""
    import numpy as np
    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F

    from scaletrain.model.gpt import GPT

    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    cfg = _config(args, Path(args.tmp) / "unused")
    block, micro = cfg.model.block_size, cfg.train.micro_batch_size
    meta = json.loads((Path(cfg.data.path) / "meta.json").read_text())
    tokens = np.memmap(Path(cfg.data.path) / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    gen = torch.Generator().manual_seed(1000 + rank)
    torch.manual_seed(cfg.run.seed)
    raw = GPT(cfg.model, meta["vocab_size"])
    opt = torch.optim.AdamW(_param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps)
    model, opt = _wrap_bare(args, cfg, raw, opt)
    deepspeed_side = args.backend.startswith("deepspeed")
    it = [0]

    def steps(n: int) -> None:
        for _ in range(n):
            lr = _cosine_lr(it[0], peak=cfg.optim.lr, floor=cfg.schedule.min_lr, warmup=cfg.schedule.warmup_steps,
                            total=cfg.train.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            ix = torch.randint(len(tokens) - block - 1, (micro,), generator=gen)
            xy = torch.stack([torch.from_numpy(tokens[i : i + block + 1].astype(np.int64)) for i in ix.tolist()])
            logits = model(xy[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), xy[:, 1:].reshape(-1))
            if deepspeed_side:
                model.backward(loss)  # clipping to gradient_clipping happens inside step()
                model.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss.item()
            it[0] += 1

    if args.profile:
        result = _profile(args, rank == 0, steps, tdist.barrier, side="bare")
    else:
        result = {"times": _time_blocks(args, steps, tdist.barrier), "is_main": rank == 0}
    tdist.destroy_process_group()
    return result


def _profile(args: argparse.Namespace, is_main: bool, steps, barrier, side: str = "harness") -> dict[str, Any]:
    """cProfile one block of one side on every rank; rank 0's tables go to stderr."""
    import cProfile
    import io
    import pstats

    steps(args.warmup)
    prof = cProfile.Profile()
    barrier()
    t0 = time.perf_counter()
    prof.enable()
    steps(args.steps)
    prof.disable()
    sec = (time.perf_counter() - t0) / args.steps
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    if is_main:
        print(f"==== {args.backend} {args.size} {side}: {1000 * sec:.1f} ms/step under cProfile ====\n"
              f"{buf.getvalue()}", file=sys.stderr, flush=True)
    return {"times": [sec], "is_main": is_main}


def _side(args: argparse.Namespace, side: str, pair: int, tmp: str) -> float | None:
    """One side's torchrun: its median seconds per step, or None when it failed."""
    from bench_memory import run_torchrun

    result = Path(tmp) / f"{side}-{args.backend.replace(':', '-')}-{pair}.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
           "--worker", side, "--backend", args.backend, "--size", args.size, "--pair", str(pair),
           "--steps", str(args.steps), "--blocks", str(args.blocks), "--warmup", str(args.warmup),
           "--timeout", str(args.timeout), "--data", args.data, "--tmp", tmp, "--result", str(result),
           *(["--profile"] if args.profile else [])]
    extra = dict(kv.split("=", 1) for kv in args.harness_env) if side == "harness" else {}
    rc = run_torchrun(cmd, {**os.environ, "OMP_NUM_THREADS": "1", **extra}, args.timeout)
    if rc != 0 or not result.is_file():
        print(f"{args.backend} {side} pair {pair}: FAILED ({'timed out' if rc == -1 else f'exit {rc}'})",
              file=sys.stderr)
        return None
    return statistics.median(json.loads(result.read_text())["times"])


def _speed(args: argparse.Namespace, tmp: str) -> dict[str, Any] | None:
    """The interleaved pairs of one backend and size."""
    ratios, h_times, b_times = [], [], []
    for pair in range(args.pairs):
        order = ("harness", "bare") if pair % 2 == 0 else ("bare", "harness")
        got = {side: _side(args, side, pair, tmp) for side in order}
        if None in got.values():
            return None
        h, b = got["harness"], got["bare"]
        ratios.append(h / b)
        h_times.append(h)
        b_times.append(b)
        print(f"[{args.backend} {args.size}] pair {pair + 1}/{args.pairs}: harness {1000 * h:.1f} ms, "
              f"bare {1000 * b:.1f} ms, ratio {h / b:.3f}", file=sys.stderr, flush=True)
    diffs = [1000 * (h - b) for h, b in zip(h_times, b_times)]
    return {"backend": args.backend, "size": args.size, "harness_ms": 1000 * statistics.median(h_times),
            "bare_ms": 1000 * statistics.median(b_times), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "overhead_ms_median": statistics.median(diffs),
            "pairs": args.pairs, "steps_per_block": args.steps, "blocks": args.blocks}


def _memory(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """bench_memory's run phase for every backend (DDP first: the reference) on the --memory-size GPT."""
    from bench_memory import run_phase

    n_layer, n_head, n_embd, block = MEMORY_SIZES[args.memory_size]
    specs = ["ddp", *(b for b in args.backends if b != "ddp")]
    runs = run_phase(specs, data=args.data, tmp=Path(tmp), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     block_size=block, timeout=args.timeout)
    ref = runs["ddp"]["peak_gb"]
    return {spec: {**r, "vs_ddp": r["peak_gb"] / ref} for spec, r in runs.items()}


def _worker_main(args: argparse.Namespace) -> int:
    import warnings

    import torch

    # torch's c10d deprecation notices repeat on every collective FSDP/DeepSpeed issue.
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    result = (_harness_worker if args.worker == "harness" else _bare_worker)(args)
    if result.pop("is_main"):
        Path(args.result).write_text(json.dumps(result))
    return 0


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--sizes", nargs="+", default=["small"], choices=sorted(SIZES))
    p.add_argument("--pairs", type=int, default=7, help="A/B pairs (at least 7 for a reported figure)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per block (default: 10 small, 100 tiny)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks per process (their median is the side's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per torchrun before it is killed")
    p.add_argument("--profile", action="store_true", help="cProfile one block of each side instead of timing")
    p.add_argument("--harness-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment of the harness side only, e.g. MALLOC_MMAP_THRESHOLD_=131072 to price a setting")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each backend's peak RSS against DDP's (bench_memory's run phase)")
    p.add_argument("--memory-size", choices=sorted(MEMORY_SIZES), default="151m")
    p.add_argument("--data", default=None, help="prepared data folder (default: prepare the built-in corpus)")
    p.add_argument("--worker", choices=("harness", "bare"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pair", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = _parse()
    if args.worker:
        return _worker_main(args)
    report: list[dict[str, Any]] = []
    failed: list[str] = []
    memory: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from scaletrain.data.prepare import prepare

            args.data = str(Path(tmp) / "data")
            prepare([], Path(args.data), max_bytes=2_000_000)
        for size in args.sizes:
            for backend in args.backends:
                args.backend, args.size = backend, size
                args.steps = args.steps or DEFAULT_STEPS[size]
                r = _speed(args, tmp)
                if r is None:
                    failed.append(f"{backend}/{size}")
                    continue
                report.append(r)
                print(f"speed  {backend:12s} {size:6s} harness {r['harness_ms']:8.2f} ms | bare {r['bare_ms']:8.2f} "
                      f"ms | ratio median {r['ratio_median']:.3f} (range {r['ratio_min']:.3f}-{r['ratio_max']:.3f}) "
                      f"| {r['pairs']} pairs x {r['blocks']} blocks x {r['steps_per_block']} steps", flush=True)
        if args.memory and not args.profile:
            memory = _memory(args, tmp)
            for spec, m in memory.items():
                print(f"memory {spec:12s} GPT {args.memory_size}: peak {m['peak_gb']:.2f} GB per rank | "
                      f"{m['vs_ddp']:.2f} x DDP | exit codes {m['codes']}", flush=True)
    print(json.dumps({"target": TARGET, "memory_target": MEMORY_TARGET, "speed": report, "memory": memory,
                      "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
