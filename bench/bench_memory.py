"""Peak memory per rank of a whole short run (model build, one optimizer step, the final save), per
backend, for a GPT too big to be copied freely: ~150 M parameters (12 layers x 1024, byte vocabulary), fp32.

Run on 2 CPU processes (the script starts them itself, one torchrun per backend):

    python bench/bench_memory.py                                  # ddp fsdp deepspeed:3
    python bench/bench_memory.py --backends fsdp tp:2 --n-layer 12 --n-embd 1024

Each rank runs the real `scaletrain train` entry point and, when it returns, reports its peak
resident memory (`VmHWM` from /proc/self/status) and the resident memory right after imports and
process-group set-up would be (`VmRSS` of a fresh interpreter that imported torch and scaletrain,
measured once). The figure is peak GB per rank, against the DDP run of the same model, and the full
fp32 model size (4 bytes x parameters) for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(args: argparse.Namespace) -> None:
    from scaletrain import cli

    out = Path(args.result) / f"rank{os.environ.get('RANK', '0')}.json"

    def record(code: int) -> None:
        out.write_text(json.dumps({"code": int(code), "peak": _status("VmHWM"), "rss": _status("VmRSS")}))

    exit_now = cli._exit_now  # runs instead of returning when a library keeps threads alive (DeepSpeed)

    def record_then_exit(code: int, threads: list[str]) -> None:
        record(code)
        exit_now(code, threads)

    cli._exit_now = record_then_exit
    record(cli.main(["train", *args.overrides]))


def _baseline() -> int:
    """VmRSS of an interpreter that imported torch and the harness (what every rank starts from)."""
    code = ("import torch, torch.distributed, scaletrain.loop, scaletrain.engines.torch_native\n"
            "for line in open('/proc/self/status'):\n"
            "    if line.startswith('VmRSS:'): print(int(line.split()[1]) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _run(spec: str, args: argparse.Namespace, tmp: Path) -> dict:
    from scaletrain.engines.registry import spec_overrides

    result = tmp / spec.replace(":", "_").replace("+", "_")
    result.mkdir()
    overrides = [
        f"data.path={args.data}", f"run.out_dir={result / 'run'}", f"model.n_layer={args.n_layer}",
        f"model.n_head={args.n_head}", f"model.n_embd={args.n_embd}", f"model.block_size={args.block_size}",
        "train.micro_batch_size=1", "train.max_steps=1", "train.eval_steps=0",
        "logging.console=false", "schedule.warmup_steps=0", "schedule.min_lr=0",
        *(f"{k}={v}" for k, v in spec_overrides(spec).items()),
    ]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--result", str(result), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout, stdout=subprocess.DEVNULL)
    ranks = [json.loads((result / f"rank{r}.json").read_text()) for r in range(2)]
    return {"peak_gb": max(r["peak"] for r in ranks) / 1e9, "codes": [r["code"] for r in ranks]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["ddp", "fsdp", "deepspeed:3"])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--data", default=None, help="prepared data folder (default: prepare the built-in corpus)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    # Blocks (attention 4 d^2, MLP 8 d^2), byte-level embedding tied to the head, positions; norms are noise.
    params = 12 * args.n_layer * args.n_embd**2 + 256 * args.n_embd + args.block_size * args.n_embd
    model_gb = 4 * params / 1e9
    base_gb = _baseline() / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from scaletrain.data import prepare

            args.data = str(Path(tmp) / "data")
            prepare([], Path(args.data), max_bytes=2_000_000)
        report = {spec: _run(spec, args, Path(tmp)) for spec in args.backends}
    print(f"GPT {params / 1e6:.0f} M parameters, full fp32 model {model_gb:.2f} GB, baseline RSS {base_gb:.2f} GB")
    ref = report.get("ddp", {}).get("peak_gb")
    for spec, r in report.items():
        vs = f" | {r['peak_gb'] / ref:.2f} x DDP" if ref else ""
        print(f"{spec:14s} peak {r['peak_gb']:.2f} GB per rank{vs} | exit codes {r['codes']}")
    print(json.dumps({"params": params, "model_gb": model_gb, "baseline_gb": base_gb, "runs": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
