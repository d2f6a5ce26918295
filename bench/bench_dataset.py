"""The dataset path's step time against a bare DDP loop over the same torch DataLoader.

Run on 2 CPU processes (the script starts them itself under torchrun):

    python bench/bench_dataset.py                       # 9 interleaved pairs of 20-step blocks
    python bench/bench_dataset.py --pairs 7 --steps 30 --workers 2

Data: a synthetic classification set made once in memory (examples are (features, label) tuples, as a
`data.factory` returns them). Model: an MLP. fp32, DDP, 2 processes sharing one process group.

Harness side: the loop's run object (`train.run.Run`: the DDP engine, the stateless epoch sampler
feeding a DataLoader with `--workers` workers, the objective with a `model.loss_fn` returning
(sum, count)) stepped with the loop's votes, and the metrics record through the sink.
Bare side, as one writes it by hand: DistributedDataParallel, a DataLoader over the same dataset
with a DistributedSampler, the same batch size and workers, cross entropy, backward,
clip_grad_norm_, AdamW step, loss.item(). The blocks alternate (A B, B A, ...); the figure is the
median of the per-pair ratios harness/bare with its range (target <= 1.03).
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

REPO = Path(__file__).resolve().parents[1]
FEATURES, CLASSES, EXAMPLES = 256, 10, 40_000
TARGET = 1.03


def datasets():
    """The benchmark's data.factory: (train, val) TensorDatasets of (features, label)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, FEATURES, generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ w).argmax(-1)
    ds = torch.utils.data.TensorDataset
    return ds(x[1000:], y[1000:]), ds(x[:1000], y[:1000])


def model(cfg, vocab_size=None):
    import torch.nn as nn

    width = cfg.n_embd
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, CLASSES))


def loss(outputs, batch):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, batch[1], reduction="sum"), batch[1].numel()


def _worker(args: argparse.Namespace) -> None:
    import warnings

    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore", category=FutureWarning)
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.train.plan import plan_run
    from scaletrain.train.run import Run

    torch.set_num_threads(1)
    ctx = dist.init(dist.current_launch(), timeout_s=600)
    out = Path(args.tmp) / "run"
    cfg = load_config(None, [
        "data.factory=bench_dataset:datasets", "model.factory=bench_dataset:model", "model.loss_fn=bench_dataset:loss",
        f"model.n_embd={args.width}", f"train.micro_batch_size={args.batch}", f"data.num_workers={args.workers}",
        "train.max_steps=1000000", "train.log_every=10", "logging.console=false", "precision=fp32",
        "schedule.kind=constant", "schedule.warmup_steps=0", "optim.lr=1e-3", f"run.out_dir={out}",
    ])
    plan = plan_run(cfg, ctx.world_size)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    run = Run(plan, ctx, [])

    def harness(n: int) -> None:
        for _ in range(n):
            res = run.step(votes=(False, False))
            run.callbacks.step_end(run.info, run.state, run.log.record(run.state, res, is_last=False))

    # The bare loop: its own model copy and a DataLoader over the same dataset and batch size.
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    torch.manual_seed(cfg.run.seed)
    raw = model(cfg.model)
    ddp = DistributedDataParallel(raw)
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
    train_ds = plan.datasets[0]
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, seed=0, drop_last=True)
    loader = DataLoader(train_ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                        prefetch_factor=4 if args.workers else None, drop_last=True, persistent_workers=args.workers > 0)
    epoch = [0]
    it = [iter(loader)]

    def next_batch():
        try:
            return next(it[0])
        except StopIteration:
            epoch[0] += 1
            sampler.set_epoch(epoch[0])
            it[0] = iter(loader)
            return next(it[0])

    def bare(n: int) -> None:
        for _ in range(n):
            x, y = next_batch()
            out_ = ddp(x)
            loss_ = F.cross_entropy(out_, y)
            loss_.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_.item()

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(args.steps)
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    harness(args.steps)
    bare(args.steps)
    ratios, h_ms, b_ms = [], [], []
    for pair in range(args.pairs):
        h, b = (timed(harness), timed(bare)) if pair % 2 == 0 else tuple(reversed((timed(bare), timed(harness))))
        ratios.append(h / b)
        h_ms.append(1000 * h)
        b_ms.append(1000 * b)
        if ctx.is_main:
            print(f"pair {pair + 1}/{args.pairs}: harness {1000 * h:.2f} ms, bare {1000 * b:.2f} ms, "
                  f"ratio {h / b:.3f}", file=sys.stderr, flush=True)
    run.callbacks.train_end(run.info, run.state, None)
    run.close()
    if ctx.is_main:
        Path(args.result).write_text(json.dumps({
            "harness_ms": statistics.median(h_ms), "bare_ms": statistics.median(b_ms),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": args.pairs, "steps": args.steps, "workers": args.workers, "batch": args.batch,
            "width": args.width}, indent=2))
    dist.teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=256, help="examples per rank per step")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--tmp", tmp, "--result", str(result), "--pairs", str(args.pairs), "--steps",
               str(args.steps), "--batch", str(args.batch), "--width", str(args.width), "--workers", str(args.workers)]
        subprocess.run(cmd, env=env, check=True, timeout=args.timeout, stdout=subprocess.DEVNULL)
        r = json.loads(result.read_text())
    verdict = "meets" if r["ratio_median"] <= TARGET else "misses"
    print(f"dataset path (DDP, 2 processes, {r['workers']} workers, batch {r['batch']}/rank, MLP width {r['width']}): "
          f"harness {r['harness_ms']:.2f} ms/step, bare {r['bare_ms']:.2f} ms/step, ratio {r['ratio_median']:.3f} "
          f"(range {r['ratio_min']:.3f}-{r['ratio_max']:.3f}, {r['pairs']} pairs x {r['steps']} steps): "
          f"{verdict} the {TARGET} target")


if __name__ == "__main__":
    main()
