"""Harness step time against a bare hand-written loop, per backend: same model, batch, data, precision.

Run on 2 CPU processes (the script starts them itself, one torchrun per backend and size):

    python bench/bench_overhead.py                                   # every backend, small GPT
    python bench/bench_overhead.py --backends ddp fsdp --pairs 9 --steps 10
    python bench/bench_overhead.py --backends ddp --sizes tiny       # fixed cost per step
    python bench/bench_overhead.py --backends deepspeed:3 --profile  # cProfile of rank 0, both sides

Both loops live in the same two processes and share one process group. They alternate in blocks
(A B, B A, A B, ...) so that the machine's minute-to-minute drift hits both alike; each block times
`--steps` optimizer steps after warm-up. The figure is the median of the per-pair ratios
harness/bare with its range, beside the median ms/step of each side and the per-pair difference.

Harness side: the engine from `loop.make_engine` (the registry's builder for the backend spec), the
loop's data sampling (`Batches`), `loop.train_step` at the schedule's learning rate with the loop's
two stop votes, and the loop's per-step bookkeeping (TrainState, throughput, the metrics.jsonl record
through the sink callback). Bare side, written the way one writes a loop by hand, nanoGPT style
(random offsets into the memmap, AdamW with decay / no-decay groups, the lr set every step, fp32):
  ddp          DistributedDataParallel, cross entropy, backward, clip_grad_norm_, step, loss.item()
  fsdp         fully_shard per block then the root, the same body (clip_grad_norm_ on DTensors)
  deepspeed:N  deepspeed.initialize over the same resolved config the harness uses (minus its
               "optimizer"/"scheduler" sections, with a torch AdamW passed in), engine.backward(loss),
               engine.step(), loss.item()
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKENDS = ("ddp", "fsdp", "deepspeed:1", "deepspeed:2", "deepspeed:3")
SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, micro_batch_size)
    "small": (4, 4, 256, 128, 8),
    "tiny": (2, 2, 64, 64, 4),
}
DEFAULT_STEPS = {"small": 10, "tiny": 100}
TARGET = 1.03  # harness / bare, median of the pairs


def _worker(args: argparse.Namespace) -> None:
    import warnings

    import torch

    # torch's c10d deprecation notices repeat on every collective FSDP/DeepSpeed issue; they would
    # bury the per-pair progress lines.
    warnings.filterwarnings("ignore", category=FutureWarning)

    from scaletrain import dist

    torch.set_num_threads(1)
    launch = dist.current_launch()
    ctx = dist.init(launch, timeout_s=args.timeout)
    result = _measure(args, ctx)
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(result, indent=2))
    dist.teardown()


def _config(args: argparse.Namespace, out: Path):
    from scaletrain.config import load_config
    from scaletrain.engines.registry import spec_overrides

    n_layer, n_head, n_embd, block, micro = SIZES[args.size]
    overrides = [f"{k}={v}" for k, v in spec_overrides(args.backend).items()]
    return load_config(
        None,
        [
            *overrides,
            f"data.path={args.data}",
            f"run.out_dir={out}",
            f"model.n_layer={n_layer}",
            f"model.n_head={n_head}",
            f"model.n_embd={n_embd}",
            f"model.block_size={block}",
            f"train.micro_batch_size={micro}",
            "precision=fp32",
            "train.max_steps=100000",
            "train.log_every=10",
            "logging.console=false",
            "schedule.warmup_steps=10",
            "optim.lr=1e-4",
            "schedule.min_lr=1e-5",
        ],
    )


def _measure(args: argparse.Namespace, ctx) -> dict[str, Any]:
    import torch

    from scaletrain import dist
    from scaletrain.train.plan import plan_run
    from scaletrain.train.run import Run

    out = Path(args.tmp) / f"{args.backend.replace(':', '-')}-{args.size}"
    cfg = _config(args, out)
    plan = plan_run(cfg, ctx.world_size)

    # Harness side: the loop's run object and per-step body (train.loop._steps without the
    # eval/checkpoint branches, which do not fire on these steps).
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    run = Run(plan, ctx, [])

    def harness_steps(n: int) -> None:
        for _ in range(n):
            step_out = run.step(votes=(False, False))
            record = run.log.record(run.state, step_out, is_last=False)
            run.callbacks.step_end(run.info, run.state, record)

    bare_steps, bare_params = _bare_loop(args, cfg, plan, ctx)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(args.steps)
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    harness_steps(args.warmup)
    bare_steps(args.warmup)
    if args.profile:
        return _profile(args, ctx, harness_steps, bare_steps, timed)
    ratios, h_times, b_times = [], [], []
    for pair in range(args.pairs):
        if pair % 2 == 0:
            h, b = timed(harness_steps), timed(bare_steps)
        else:
            b, h = timed(bare_steps), timed(harness_steps)
        ratios.append(h / b)
        h_times.append(h)
        b_times.append(b)
        if ctx.is_main:
            print(f"[{args.backend} {args.size}] pair {pair + 1}/{args.pairs}: harness {1000 * h:.1f} ms, "
                  f"bare {1000 * b:.1f} ms, ratio {h / b:.3f}", file=sys.stderr, flush=True)
    run.callbacks.train_end(run.info, run.state, None)
    run.close()
    diffs = [1000 * (h - b) for h, b in zip(h_times, b_times)]
    return {
        "backend": args.backend,
        "size": args.size,
        "params": bare_params,  # counted before wrapping: ZeRO-3 leaves the engine's module empty
        "harness_ms": 1000 * statistics.median(h_times),
        "bare_ms": 1000 * statistics.median(b_times),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "overhead_ms_median": statistics.median(diffs),
        "overhead_ms_min": min(diffs),
        "overhead_ms_max": max(diffs),
        "ratios": ratios,
        "pairs": args.pairs,
        "steps_per_block": args.steps,
        "torch_threads": torch.get_num_threads(),
    }


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


def _bare_loop(args: argparse.Namespace, cfg, plan, ctx):
    """(run n steps, parameter count) of a hand-written loop for args.backend."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from scaletrain.model.gpt import GPT

    block, micro = cfg.model.block_size, cfg.train.micro_batch_size
    tokens = np.memmap(Path(cfg.data.path) / "train.bin", dtype=np.dtype(plan.data_meta.dtype), mode="r")
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    torch.manual_seed(cfg.run.seed)
    raw = GPT(cfg.model, plan.vocab_size)
    n_params = sum(p.numel() for p in raw.parameters())
    kind = args.backend.partition(":")[0]
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw)
    elif kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in raw.blocks:
            fully_shard(blk)
        model = fully_shard(raw)
    opt = torch.optim.AdamW(_param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    if kind == "deepspeed":
        import deepspeed

        from scaletrain.engines.ds_config import resolve_ds_config

        ds_config = {k: v for k, v in resolve_ds_config(cfg, world_size=ctx.world_size,
                                                                     hidden_size=cfg.model.n_embd).items()
                     if k not in ("optimizer", "scheduler")}
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        model, opt, _, _ = deepspeed.initialize(model=raw, optimizer=opt, config=ds_config,
                                                dist_init_required=False)
    it = [0]

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(tokens) - block - 1, (micro,), generator=gen)
        xy = torch.stack([torch.from_numpy(tokens[i : i + block + 1].astype(np.int64)) for i in ix.tolist()])
        return xy[:, :-1], xy[:, 1:]

    def steps(n: int) -> None:
        for _ in range(n):
            lr = _cosine_lr(it[0], peak=cfg.optim.lr, floor=cfg.schedule.min_lr,
                            warmup=cfg.schedule.warmup_steps, total=cfg.train.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch()
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            if kind == "deepspeed":
                model.backward(loss)  # clipping to gradient_clipping happens inside step()
                model.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss.item()
            it[0] += 1

    return steps, n_params


def _profile(args: argparse.Namespace, ctx, harness_steps, bare_steps, timed) -> dict[str, Any]:
    """cProfile both sides on every rank (ranks wait for each other); rank 0's tables go to stderr."""
    import cProfile
    import io
    import pstats

    tables = {}
    for name, fn in (("harness", harness_steps), ("bare", bare_steps)):
        prof = cProfile.Profile()
        prof.enable()
        sec = timed(fn)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        tables[name] = {"ms_per_step": 1000 * sec, "table": buf.getvalue()}
        if ctx.is_main:
            print(f"==== {args.backend} {args.size} {name}: {1000 * sec:.1f} ms/step under cProfile ====\n"
                  f"{buf.getvalue()}", file=sys.stderr, flush=True)
    return {"backend": args.backend, "size": args.size, "profile": tables}


def _run_torchrun(cmd: list[str], env: dict[str, str], timeout: float) -> int:
    """Run one torchrun in its own session; on timeout kill the whole group (torchrun and its ranks)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return -1
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--sizes", nargs="+", default=["small"], choices=sorted(SIZES))
    p.add_argument("--pairs", type=int, default=7, help="A/B pairs (at least 7 for a reported figure)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per block (default: 10 small, 100 tiny)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per torchrun before it is killed")
    p.add_argument("--profile", action="store_true", help="cProfile one block of each side instead of timing")
    p.add_argument("--data", default=None, help="prepared data folder (default: prepare the built-in corpus)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    report: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from scaletrain.data.prepare import prepare

            args.data = str(Path(tmp) / "data")
            prepare([], Path(args.data))
        for size in args.sizes:
            for backend in args.backends:  # one torchrun each: its own process group, its own block length
                result = Path(tmp) / f"{backend.replace(':', '-')}-{size}.json"
                cmd = [
                    str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                    __file__, "--worker", "--backend", backend, "--size", size,
                    "--pairs", str(args.pairs), "--steps", str(args.steps or DEFAULT_STEPS[size]),
                    "--warmup", str(args.warmup), "--timeout", str(args.timeout), "--data", args.data,
                    "--tmp", tmp, "--result", str(result),
                ] + (["--profile"] if args.profile else [])
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                rc = _run_torchrun(cmd, env, args.timeout)
                if rc != 0 or not result.is_file():
                    why = "timed out" if rc == -1 else f"exit {rc}"
                    print(f"{backend:12s} {size:6s} FAILED ({why})", file=sys.stderr)
                    failed.append(f"{backend}/{size}")
                    continue
                r = json.loads(result.read_text())
                report.append(r)
                if args.profile:
                    continue
                print(
                    f"{backend:12s} {size:6s} {r['params'] / 1e6:5.2f}M params | harness {r['harness_ms']:8.2f} ms | "
                    f"bare {r['bare_ms']:8.2f} ms | ratio median {r['ratio_median']:.3f} (range "
                    f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | overhead {r['overhead_ms_median']:+.2f} ms/step "
                    f"(range {r['overhead_ms_min']:+.2f}..{r['overhead_ms_max']:+.2f}) | {r['pairs']} pairs x "
                    f"{r['steps_per_block']} steps", flush=True,
                )
    if args.profile:
        print(json.dumps({"profile": [{"backend": r["backend"], "size": r["size"],
                                       **{k: v["ms_per_step"] for k, v in r["profile"].items()}} for r in report],
                          "failed": failed}))
    else:
        print(json.dumps({"target": TARGET, "results": report, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
