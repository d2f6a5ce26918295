"""Harness DDP step time against a bare hand-written DDP loop, same model, batch, data and precision.

Run on 2 CPU processes (the script starts them itself):

    python bench/bench_ddp_overhead.py                 # both sizes
    python bench/bench_ddp_overhead.py --sizes tiny --pairs 9

Both loops live in the same two processes and share one process group. They alternate in blocks
(A B, B A, A B, ...) so that the machine's minute-to-minute drift hits both alike; each block times
`--steps` optimizer steps after warm-up. The figure is the median of the per-pair ratios
harness/bare with its range. The harness side runs the loop's own `train_step` plus its data
sampling and its metrics.jsonl record; the bare side is a nanoGPT-style loop: random offsets into a
memmap, DDP forward, cross entropy, backward, global-norm clip, AdamW step, loss.item().
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, micro_batch_size)
    "small": (4, 4, 256, 128, 8),
    "tiny": (2, 2, 64, 64, 4),
}


def _worker(args: argparse.Namespace) -> None:
    import torch

    from scaletrain import dist

    torch.set_num_threads(1)
    launch = dist.current_launch()
    results = {size: _measure(size, args, launch) for size in args.sizes}
    if launch.rank == 0:
        Path(args.result).write_text(json.dumps(results, indent=2))
    dist.teardown()


def _measure(size: str, args: argparse.Namespace, launch) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.data import Batches
    from scaletrain.loop import make_engine, plan_run, train_step
    from scaletrain.metrics import make_sink
    from scaletrain.model import GPT

    n_layer, n_head, n_embd, block, micro = SIZES[size]
    out = Path(args.tmp) / size
    cfg = load_config(
        None,
        [
            f"data.path={args.data}",
            f"run.out_dir={out}",
            f"model.n_layer={n_layer}",
            f"model.n_head={n_head}",
            f"model.n_embd={n_embd}",
            f"model.block_size={block}",
            f"train.micro_batch_size={micro}",
            "train.max_steps=100000",
            "logging.console=false",
            "schedule.warmup_steps=10",
            "optim.lr=1e-4",
            "schedule.min_lr=1e-5",
        ],
    )
    plan = plan_run(cfg, launch.world_size)
    ctx = (
        dist.init(launch, timeout_s=300)
        if not torch.distributed.is_initialized()
        else dist.DistContext(
            launch.rank, launch.local_rank, launch.world_size, torch.device("cpu"), launch.launcher
        )
    )
    # Harness side: the loop's engine, data and per-step body.
    engine = make_engine(plan, ctx)
    batches = Batches(
        cfg.data.path, plan.data_meta, block_size=block, plan=plan.batch, rank=ctx.rank, seed=cfg.run.seed
    )
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sink = make_sink(ctx.is_main, out, cfg.logging, cfg.to_json_dict())
    h_step = [0]

    def harness_steps(n: int) -> None:
        for _ in range(n):
            loss, stats, _ = train_step(engine, batches.train_micro_batches(h_step[0]), ctx, 1e-4)
            h_step[0] += 1
            sink.log(
                {"step": h_step[0], "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm},
                console=False,
            )

    # Bare side: written the way one writes a loop by hand.
    torch.manual_seed(cfg.run.seed)
    raw = GPT(cfg.model, plan.vocab_size)
    model = DistributedDataParallel(raw)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = np.memmap(Path(args.data) / "train.bin", dtype=np.uint16, mode="r")
    gen = torch.Generator().manual_seed(1000 + ctx.rank)

    def bare_steps(n: int) -> None:
        for _ in range(n):
            ix = torch.randint(len(tokens) - block - 1, (micro,), generator=gen)
            xy = torch.stack(
                [torch.from_numpy(tokens[i : i + block + 1].astype(np.int64)) for i in ix.tolist()]
            )
            x, y = xy[:, :-1], xy[:, 1:]
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(args.steps)
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    harness_steps(args.warmup)
    bare_steps(args.warmup)
    ratios, h_times, b_times = [], [], []
    for pair in range(args.pairs):
        if pair % 2 == 0:
            h, b = timed(harness_steps), timed(bare_steps)
        else:
            b, h = timed(bare_steps), timed(harness_steps)
        ratios.append(h / b)
        h_times.append(h)
        b_times.append(b)
    sink.close()
    diffs = [1000 * (h - b) for h, b in zip(h_times, b_times)]
    result = {
        "params": sum(p.numel() for p in raw.parameters()),
        "harness_ms": 1000 * statistics.median(h_times),
        "bare_ms": 1000 * statistics.median(b_times),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "overhead_ms_median": statistics.median(diffs),
        "overhead_ms_min": min(diffs),
        "overhead_ms_max": max(diffs),
        "pairs": args.pairs,
        "steps_per_block": args.steps,
    }
    engine.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=sorted(SIZES))
    p.add_argument("--pairs", type=int, default=7, help="A/B pairs (at least 5)")
    p.add_argument("--steps", type=int, default=0, help="steps per block (default: 10 small, 100 tiny)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", default=None, help="prepared data folder (default: prepare the built-in corpus)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from scaletrain.data import prepare

            args.data = str(Path(tmp) / "data")
            prepare([], Path(args.data))
        report = {}
        for size in args.sizes:  # one torchrun per size so each picks its own block length
            steps = args.steps or (10 if size == "small" else 100)
            result = Path(tmp) / f"{size}.json"
            cmd = [
                str(Path(sys.executable).parent / "torchrun"),
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--worker",
                "--sizes",
                size,
                "--pairs",
                str(args.pairs),
                "--steps",
                str(steps),
                "--warmup",
                str(args.warmup),
                "--data",
                args.data,
                "--tmp",
                tmp,
                "--result",
                str(result),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, timeout=3600, stdout=subprocess.DEVNULL)
            report.update(json.loads(result.read_text()))
    for size, r in report.items():
        print(
            f"{size:6s} {r['params'] / 1e6:6.2f}M params | harness {r['harness_ms']:8.2f} ms | bare "
            f"{r['bare_ms']:8.2f} ms | ratio median {r['ratio_median']:.3f} (range {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}) | overhead {r['overhead_ms_median']:+.2f} ms/step "
            f"(range {r['overhead_ms_min']:+.2f}..{r['overhead_ms_max']:+.2f}) | {r['pairs']} pairs x "
            f"{r['steps_per_block']} steps"
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
