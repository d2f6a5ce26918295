"""`scaletrain parity`: the same short run on several backends, step by step side by side.

Every backend in `--backends` (specs as `scaletrain.engines.registry.spec_overrides` reads them) gets
a real training run: `--nproc` processes under `torch.distributed.run`, the same config, seed and data,
fp32, `--steps` optimizer steps, a metrics record every step, each in a run folder of its own under
`--out`. The runs go one after another. The first backend listed is the reference; each step's loss,
gradient norm and learning rate of every other backend are compared with it as a relative difference
|a - b| / max(|a|, |b|).

Tolerance: `--tolerance` when given, for every backend; otherwise 1e-4, and 1e-3 for tensor-parallel
specs (`tp:N` splits matrix products, so sums run in another order and the gap grows with width and steps).
When the backends would read different global batches (tensor parallel shrinks the data-parallel size)
and the config does not fix `train.global_batch_size`, it is pinned to the largest of them for all.

The overrides of a training command can be pasted as they are: for the keys parity owns (`OWNED_KEYS`)
its own values win, in the shared overrides and in `--override SPEC:key=value` alike, and one stderr
line names each value it replaced.

Everything is checked before the first launch (each backend's config with its overrides, world-size
rules, data), so a bad input is one line and exit 2 without any training. Exit codes: 0 every backend
agrees; 1 a backend diverges or fails to run (its last stderr lines are shown); 2 bad input; 130
interrupted. Each run starts in a session of its own and is killed as a group on timeout or interrupt.

Imports: `scaletrain.config`, `scaletrain.engines.registry`, `scaletrain.errors`,
`scaletrain.experiments.parity_compare` (the comparison and the report), `scaletrain.train.loop` (lazily,
for its checks), `scaletrain.procs` (child processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scaletrain.config import load_config, parse_overrides
from scaletrain.engines.registry import SPEC_HELP, spec_overrides
from scaletrain.errors import ConfigError
from scaletrain.experiments.parity_compare import DEFAULT_TOLERANCE as DEFAULT_TOLERANCE
from scaletrain.experiments.parity_compare import DEFAULT_TP_TOLERANCE as DEFAULT_TP_TOLERANCE
from scaletrain.experiments.parity_compare import BackendRun, compare, report
from scaletrain.procs import Interrupted, interrupt_scope, kill_group, start_child

# Keys parity sets itself, and who decides them: a user's value for one is replaced, and said so.
OWNED_KEYS = {"run.out_dir": "--out", "train.max_steps": "--steps", "train.log_every": "parity (every step)",
              "precision": "parity (always fp32)", "checkpoint.every": "parity (no periodic saves)",
              "checkpoint.resume": "parity (always a fresh run)"}
TAIL_LINES = 15


# ---------------------------------------------------------------------------------------------
# Input


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def take_owned(items: list[str], where: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """Split overrides into those parity passes on and the `OWNED_KEYS` it sets itself:
    (kept items, [(where + key, value as the user wrote it)]). An item that sets owned and other keys
    at once (a whole section) is kept; parity's own values come after it and win."""
    kept, owned = [], []
    for item in items:
        flat = _flat(parse_overrides([item]))
        mine = [k for k in flat if k in OWNED_KEYS]
        owned += [(f"{where}{k}", item.partition("=")[2].strip() if len(flat) == 1 else json.dumps(flat[k]))
                  for k in mine]
        if not flat or len(mine) < len(flat):
            kept.append(item)
    return kept, owned


def _forced(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """What parity sets in every run, whatever the overrides say (the OWNED_KEYS and the console)."""
    return {"precision": "fp32", "train.max_steps": args.steps, "train.log_every": 1, "checkpoint.every": 0,
            "checkpoint.resume": "never", "run.out_dir": run_dir, "logging.console": "false"}


def replaced_line(owned: list[tuple[str, str]], args: argparse.Namespace, out: Path) -> str | None:
    """The one stderr line that says which of the user's overrides parity replaced, and by what."""
    if not owned:
        return None
    ours = _forced(args, out / "<n>-<spec>")
    said = ", ".join(f"{key}={value} -> {ours[key.rpartition(':')[2]]}" for key, value in owned)
    flags = sorted({OWNED_KEYS[k.rpartition(":")[2]] for k, _ in owned} & {"--out", "--steps"})
    return f"parity: replaced {said} (parity sets them{'; ' + ' and '.join(flags) + ' choose them' if flags else ''})"


def parse_specs(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if len(specs) < 2:
        raise ConfigError(f"--backends {text!r}: name at least two backends to compare, e.g. --backends ddp,fsdp "
                          f"({SPEC_HELP})")
    seen: dict[str, str] = {}
    for s in specs:
        try:
            key = json.dumps(spec_overrides(s), sort_keys=True)
        except ConfigError as e:
            raise ConfigError(f"--backends: {e}") from None
        if key in seen:
            raise ConfigError(f"--backends: {s!r} and {seen[key]!r} are the same backend; list each once")
        seen[key] = s
    return specs


def parse_backend_overrides(items: list[str], specs: list[str]) -> dict[str, list[str]]:
    """`--override SPEC:key=value` -> {spec as listed in --backends: [key=value, ...]}."""
    canon = {json.dumps(spec_overrides(s), sort_keys=True): s for s in specs}
    out: dict[str, list[str]] = {s: [] for s in specs}
    for item in items:
        head, sep, value = item.partition("=")
        spec, colon, key = head.rpartition(":")
        if not sep or not colon or not spec or not key:
            raise ConfigError(f"--override {item!r}: expected SPEC:key=value, e.g. --override fsdp:optim.lr=2e-3")
        try:
            target = canon.get(json.dumps(spec_overrides(spec), sort_keys=True))
        except ConfigError as e:
            raise ConfigError(f"--override {item!r}: {e}") from None
        if target is None:
            raise ConfigError(f"--override {item!r}: {spec!r} is not among --backends ({', '.join(specs)}); "
                              "use one of those specs")
        out[target].append(f"{key.strip()}={value}")
    return out


def _folder_name(i: int, spec: str) -> str:
    return f"{i}-" + "".join(c if c.isalnum() or c in "+-_" else "_" for c in spec.lower())


def _spec_items(spec: str) -> list[str]:
    items = spec_overrides(spec)
    items.setdefault("backend.tp_size", 1)  # a spec names one backend exactly: no tensor parallel unless tp:N
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in items.items()]


def plan_runs(args: argparse.Namespace, out: Path) -> list[BackendRun]:
    """Every backend's overrides, checked the way `scaletrain train` checks them. Raises ConfigError."""
    specs = parse_specs(args.backends)
    base, owned = take_owned(list(args.overrides))
    extra = parse_backend_overrides(list(args.override), specs)
    from scaletrain.train.loop import plan_run
    runs = []
    for i, spec in enumerate(specs, 1):
        run_dir = out / _folder_name(i, spec)
        if run_dir.exists():
            raise ConfigError(f"--out {out}: {run_dir.name} already exists; choose a new --out folder")
        mine, also = take_owned(extra[spec], f"{spec}:")
        owned += also
        forced = [f"{k}={v}" for k, v in _forced(args, run_dir).items()]
        runs.append(BackendRun(spec, [*base, *_spec_items(spec), *forced, *mine], run_dir,
                               tp=spec_overrides(spec).get("backend.tp_size", 1) > 1))

    def check(run: BackendRun, pinned: list[str]) -> Any:
        try:
            cfg = load_config(args.config, [*run.overrides, *pinned])
            return cfg, plan_run(cfg, args.nproc)
        except ConfigError as e:
            raise ConfigError(f"backend {run.spec}: {e}") from None

    plans = [check(r, []) for r in runs]
    batches = {r.spec: p.batch.global_batch_size for r, (_, p) in zip(runs, plans, strict=True)}
    if len(set(batches.values())) > 1:
        said = ", ".join(f"{s} {b}" for s, b in batches.items())
        if any(cfg.train.grad_accum is not None or cfg.train.global_batch_size is not None for cfg, _ in plans):
            raise ConfigError(f"parity: the backends would train on different global batches ({said}); set "
                              f"train.global_batch_size={max(batches.values())} for all, not train.grad_accum")
        pinned = [f"train.global_batch_size={max(batches.values())}"]
        for r in runs:
            check(r, pinned)
            r.overrides.append(pinned[0])
        print(f"parity: global batches differ ({said}); every backend runs {pinned[0]}", file=sys.stderr)
    if line := replaced_line(owned, args, out):
        print(line, file=sys.stderr)
    return runs


# ---------------------------------------------------------------------------------------------
# Running



def _child_env() -> dict[str, str]:
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")}


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last lines the workers wrote, before the launcher's own failure report (which names the
    worker entry module and exit codes, not the cause); lines every rank wrote alike appear once."""
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    cut = next((i for i, ln in enumerate(lines) if "torch/distributed/elastic/" in ln), len(lines))
    return list(dict.fromkeys(lines[:cut] or lines))[-n:]


def _read_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "loss" in rec:
            out[rec["step"]] = rec
    return out


def launch(args: argparse.Namespace, run: BackendRun, out: Path) -> None:
    """One backend's training run, to the end or its timeout. Fills run.records or run.error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           # `-m scaletrain.procs` ties each worker to its launcher before anything else, then runs `scaletrain`.
           "-m", "scaletrain.procs", "train", *(["--config", str(args.config)] if args.config else []),
           *run.overrides]
    log_out, log_err = out / f"{run.run_dir.name}.log", out / f"{run.run_dir.name}.err"
    start = time.monotonic()
    with open(log_out, "wb") as fo, open(log_err, "wb") as fe:
        proc = start_child(cmd, stdout=fo, stderr=fe, env=_child_env())
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        rc = None
    except BaseException:
        kill_group(proc)
        raise
    run.seconds = time.monotonic() - start
    run.records = _read_records(run.run_dir)
    if rc is None:
        run.error = f"timed out after {args.timeout:g}s (--timeout)"
    elif rc != 0:
        run.error = f"exit code {rc}"
    elif not run.records:
        run.error = f"no metrics in {run.run_dir / 'metrics.jsonl'}"
    if run.error:
        run.tail = _tail(log_err) or _tail(log_out)


def run_parity(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.nproc < 1:
        raise ConfigError(f"--{'steps' if args.steps < 1 else 'nproc'} must be >= 1")
    if args.tolerance is not None and not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be a positive relative difference, e.g. 1e-4 (got {args.tolerance})")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds per backend")
    temp = args.out is None
    out = Path(tempfile.mkdtemp(prefix="scaletrain-parity-")) if temp else Path(args.out)
    remove = temp and not args.keep
    try:
        runs = plan_runs(args, out)
        out.mkdir(parents=True, exist_ok=True)

        try:
            with interrupt_scope():
                for i, run in enumerate(runs, 1):
                    print(f"parity: [{i}/{len(runs)}] {run.spec} ...", file=sys.stderr, flush=True)
                    launch(args, run, out)
                    state = f"failed ({run.error})" if run.error else "done"
                    print(f"parity: [{i}/{len(runs)}] {run.spec} {state} in {run.seconds:.0f}s", file=sys.stderr,
                          flush=True)
        except (Interrupted, KeyboardInterrupt) as e:
            print(f"parity interrupted ({e or 'SIGINT'}); the running backend was stopped", file=sys.stderr)
            return 130
        code = report(runs, compare(runs, args.steps, args.tolerance), args, kept=not remove)
        if not remove:
            print(f"run folders and logs: {out}", file=sys.stderr)
        return code
    finally:
        if remove:
            shutil.rmtree(out, ignore_errors=True)
