"""Peak memory per rank of a whole short run (model build, one optimizer step, the final save), per
backend, for a GPT too big to be copied freely: ~150 M parameters (12 layers x 1024, byte vocabulary), fp32.

Run on 2 CPU processes (the script starts them itself, one torchrun per case):

    python bench/bench_memory.py                                  # both phases; ddp fsdp deepspeed:3
    python bench/bench_memory.py --phase run --backends fsdp tp:2

Phase `build`: per rank, the peak RSS growth (`VmHWM` after the build minus `VmRSS` before it, with
VmHWM reset first) of model construction alone: the plain full build (what DDP holds), meta + FSDP +
materialise, meta + TP x FSDP + materialise, and zero.Init for ZeRO-3, as a multiple of the full fp32
model (target <= 0.6 for the sharded ones). Phase `run`: each rank runs the real `scaletrain train`
entry point for one step with its final save and reports its peak RSS (`VmHWM`), against DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    from scaletrain.commands import train as train_command

    out = Path(args.result) / f"rank{os.environ.get('RANK', '0')}.json"

    def record(code: int) -> None:
        out.write_text(json.dumps({"code": int(code), "peak": _status("VmHWM"), "rss": _status("VmRSS")}))

    exit_now = train_command._exit_now  # runs instead of returning when a library keeps threads alive (DeepSpeed)

    def record_then_exit(code: int, threads: list[str]) -> None:
        record(code)
        exit_now(code, threads)

    train_command._exit_now = record_then_exit
    record(cli.main(["train", *args.overrides]))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _build_worker(args: argparse.Namespace) -> None:
    """Phase `build`: peak RSS growth of model construction alone, before any optimizer state exists."""

    from scaletrain import dist
    from scaletrain.config import ModelConfig
    from scaletrain.model.gpt import GPT

    ctx = dist.init(dist.current_launch(), timeout_s=600)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    factory = lambda: GPT(cfg, 256)  # noqa: E731
    # Import everything a variant uses before the baseline, so the growth is the model's alone.
    import scaletrain.engines.parallel
    import scaletrain.engines.tensor_parallel
    import scaletrain.model.materialize
    if args.variant == "zero3":
        import scaletrain.engines.deepspeed_zero  # noqa: F401
    if args.warm:  # the same path once on a tiny model: code pages and allocator arenas are then in place
        from scaletrain.hostmem import returning_freed_memory

        with returning_freed_memory():
            _build(args, ctx, lambda: GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16), 256))
    from scaletrain.hostmem import returning_freed_memory

    baseline = _status("VmRSS")
    reset = _reset_peak()
    with returning_freed_memory():  # as `registry.build_engine` builds
        model = _build(args, ctx, factory)
    peak = _status("VmHWM")
    out = Path(args.result) / f"rank{ctx.rank}.json"
    out.write_text(json.dumps({"baseline": baseline, "peak": peak, "reset": reset,
                               "params": sum(p.numel() for p in model.parameters())}))
    del model
    dist.teardown()


def _build(args: argparse.Namespace, ctx, factory):
    """One model construction of `args.variant`, returning the model."""
    if args.variant == "plain":
        from scaletrain.model.materialize import build_initialized

        return build_initialized(factory, device=ctx.device, seed=0)
    elif args.variant == "zero3":
        from scaletrain.config import load_config
        from scaletrain.engines.deepspeed_zero import build_zero3
        from scaletrain.engines.ds_config import resolve_ds_config

        ds = resolve_ds_config(load_config(None, ["backend=deepspeed", "backend.deepspeed.stage=3",
                                                  "train.micro_batch_size=1"]), world_size=ctx.world_size,
                                hidden_size=args.n_embd)
        ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
        return build_zero3(factory, ds, seed=0, source=None)
    else:  # meta build, FSDP (or TP x FSDP) on meta, then each rank materialises its shard
        from scaletrain.engines import parallel
        from scaletrain.engines.backends.fsdp import FSDPConfig
        from scaletrain.model.materialize import build_on_meta, materialize

        tp = 2 if args.variant == "tp" else 1
        mesh = parallel.build_mesh(ctx, fsdp=FSDPConfig(), tp_size=tp)
        model = build_on_meta(factory)
        if tp > 1:
            parallel.apply_tp(model, mesh)
        parallel.apply_fsdp(model, parallel.model_blocks(model), FSDPConfig(), mesh=mesh, precision="fp32",
                            device_type=ctx.device_type)
        materialize(model, device=ctx.device, seed=0)
    return model


def _build_phase(args: argparse.Namespace, tmp: Path, params: int) -> dict:
    report = {}
    for variant in ("plain", "fsdp", "tp", "zero3"):
        result = tmp / f"build_{variant}"
        result.mkdir()
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
               "--build-worker", "--variant", variant, "--result", str(result), "--n-layer", str(args.n_layer),
               "--n-head", str(args.n_head), "--n-embd", str(args.n_embd), "--block-size", str(args.block_size),
               *(["--warm"] if args.warm else [])]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=args.timeout,
                       stdout=subprocess.DEVNULL)
        ranks = [json.loads((result / f"rank{r}.json").read_text()) for r in range(2)]
        growth = max(r["peak"] - r["baseline"] for r in ranks)
        report[variant] = {"growth_gb": growth / 1e9, "ratio_to_model": growth / (4 * params),
                           "peak_reset": all(r["reset"] for r in ranks)}
    return report


def _baseline() -> int:
    """VmRSS of an interpreter that imported torch and the harness (what every rank starts from)."""
    code = ("import torch, torch.distributed, scaletrain.train.loop, scaletrain.engines.torch_native\n"
            "for line in open('/proc/self/status'):\n"
            "    if line.startswith('VmRSS:'): print(int(line.split()[1]) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_torchrun(cmd: list[str], env: dict[str, str], timeout: float) -> int:
    """Run one torchrun in its own session; on timeout kill the whole group (torchrun and its ranks).
    Returns its exit code, -1 on timeout."""
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


def _run(spec: str, *, data: str, tmp: Path, n_layer: int, n_head: int, n_embd: int, block_size: int,
         timeout: float) -> dict:
    from scaletrain.engines.registry import spec_overrides

    result = tmp / f"memory-{spec.replace(':', '_').replace('+', '_')}"
    result.mkdir()
    overrides = [
        f"data.path={data}", f"run.out_dir={result / 'run'}", f"model.n_layer={n_layer}",
        f"model.n_head={n_head}", f"model.n_embd={n_embd}", f"model.block_size={block_size}",
        "train.micro_batch_size=1", "train.max_steps=1", "train.eval_steps=0",
        "logging.console=false", "schedule.warmup_steps=0", "schedule.min_lr=0",
        *(f"{k}={v}" for k, v in spec_overrides(spec).items()),
    ]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--result", str(result), "--", *overrides]
    rc = run_torchrun(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout)
    if rc != 0:
        raise RuntimeError(f"bench_memory: the {spec} run failed (exit {rc})")
    ranks = [json.loads((result / f"rank{r}.json").read_text()) for r in range(2)]
    return {"peak_gb": max(r["peak"] for r in ranks) / 1e9, "codes": [r["code"] for r in ranks]}


def run_phase(specs: list[str], *, data: str, tmp: Path, n_layer: int, n_head: int, n_embd: int,
              block_size: int, timeout: float) -> dict[str, dict]:
    """Phase `run` for every spec: {spec: {"peak_gb": per-rank peak of the rank that peaked, "codes": ...}}."""
    return {spec: _run(spec, data=data, tmp=tmp, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       block_size=block_size, timeout=timeout) for spec in specs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["ddp", "fsdp", "deepspeed:3"])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--data", default=None, help="prepared data folder (default: prepare the built-in corpus)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--phase", choices=["build", "run", "both"], default="both",
                   help="build: peak growth of model construction; run: peak of a 1-step run with its save")
    p.add_argument("--warm", action="store_true",
                   help="build phase: run the build path once on a tiny model before the baseline (code pages)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    if args.build_worker:
        _build_worker(args)
        return 0
    # Blocks (attention 4 d^2, MLP 8 d^2), byte-level embedding tied to the head, positions; norms are noise.
    params = 12 * args.n_layer * args.n_embd**2 + 256 * args.n_embd + args.block_size * args.n_embd
    model_gb = 4 * params / 1e9
    base_gb = _baseline() / 1e9
    report: dict = {}
    build: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.phase in ("build", "both"):
            build = _build_phase(args, Path(tmp), params)
        if args.phase in ("run", "both"):
            if args.data is None:
                from scaletrain.data.prepare import prepare

                args.data = str(Path(tmp) / "data")
                prepare([], Path(args.data), max_bytes=2_000_000)
            report = run_phase(args.backends, data=args.data, tmp=Path(tmp), n_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                               timeout=args.timeout)
    print(f"GPT {params / 1e6:.0f} M parameters, full fp32 model {model_gb:.2f} GB, baseline RSS {base_gb:.2f} GB")
    for variant, r in build.items():
        print(f"build {variant:6s} peak growth {r['growth_gb']:.3f} GB per rank = {r['ratio_to_model']:.2f} x the "
              f"full fp32 model{'' if r['peak_reset'] else ' (VmHWM could not be reset: growth overstated)'}")
    ref = report.get("ddp", {}).get("peak_gb")
    for spec, r in report.items():
        vs = f" | {r['peak_gb'] / ref:.2f} x DDP" if ref else ""
        print(f"run   {spec:14s} peak {r['peak_gb']:.2f} GB per rank{vs} | exit codes {r['codes']}")
    print(json.dumps({"params": params, "model_gb": model_gb, "baseline_gb": base_gb, "build": build, "runs": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
