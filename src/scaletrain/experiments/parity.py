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

Everything is checked before the first launch (each backend's config with its overrides, world-size
rules, data), so a bad input is one line and exit 2 without any training. Exit codes: 0 every backend
agrees; 1 a backend diverges or fails to run (its last stderr lines are shown); 2 bad input; 130
interrupted. Each run starts in a session of its own and is killed as a group on timeout or interrupt.

Imports: rich (lazily), `scaletrain.config`, `scaletrain.engines.registry`, `scaletrain.errors`,
`scaletrain.train.loop` (lazily, for its checks), `scaletrain.procs` (child processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.config import load_config, parse_overrides
from scaletrain.engines.registry import SPEC_HELP, spec_overrides
from scaletrain.errors import ConfigError, ExitCode
from scaletrain.procs import Interrupted, die_with_parent_fn, kill_group

DEFAULT_TOLERANCE = 1e-4
DEFAULT_TP_TOLERANCE = 1e-3
# Keys parity sets itself; the message says which flag controls each.
OWNED_KEYS = {"run.out_dir": "--out", "train.max_steps": "--steps", "train.log_every": "parity (every step)",
              "precision": "parity (always fp32)", "checkpoint.every": "parity (no periodic saves)",
              "checkpoint.resume": "parity (always a fresh run)"}
METRICS = ("loss", "grad_norm", "lr")
TAIL_LINES = 15


@dataclass
class BackendRun:
    spec: str  # as the user wrote it
    overrides: list[str]  # everything after the base overrides, in order
    run_dir: Path
    tp: bool
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # why the run failed, when it did
    tail: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Input


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_owned(items: list[str], where: str) -> None:
    for key in _flat(parse_overrides(items)):
        if key in OWNED_KEYS:
            raise ConfigError(f"{where}: {key} is set by {OWNED_KEYS[key]}; drop it from the overrides")


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
        _check_owned([f"{key}={value}"], f"--override {item!r}")
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
    _check_owned(list(args.overrides), "overrides")
    extra = parse_backend_overrides(list(args.override), specs)
    from scaletrain.train.loop import plan_run
    runs = []
    for i, spec in enumerate(specs, 1):
        run_dir = out / _folder_name(i, spec)
        if run_dir.exists():
            raise ConfigError(f"--out {out}: {run_dir.name} already exists; choose a new --out folder")
        forced = ["precision=fp32", f"train.max_steps={args.steps}", "train.log_every=1", "checkpoint.every=0",
                  "checkpoint.resume=never", f"run.out_dir={run_dir}", "logging.console=false"]
        runs.append(BackendRun(spec, [*_spec_items(spec), *forced, *extra[spec]], run_dir,
                               tp=spec_overrides(spec).get("backend.tp_size", 1) > 1))

    def check(run: BackendRun, pinned: list[str]) -> Any:
        try:
            cfg = load_config(args.config, [*args.overrides, *run.overrides, *pinned])
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
           *args.overrides, *run.overrides]
    log_out, log_err = out / f"{run.run_dir.name}.log", out / f"{run.run_dir.name}.err"
    start = time.monotonic()
    with open(log_out, "wb") as fo, open(log_err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=_child_env(), start_new_session=True,
                                preexec_fn=die_with_parent_fn())
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


# ---------------------------------------------------------------------------------------------
# Comparing


def rel_diff(a: Any, b: Any) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


@dataclass
class StepRow:
    step: int
    worst: float  # the largest relative difference from the reference, any metric, any backend
    offenders: list[str]  # "spec metric" pairs beyond their tolerance
    missing: list[str]  # backends without a record of this step (a failed run)


def compare(runs: list[BackendRun], steps: int, tolerance: float | None) -> list[StepRow]:
    ref = runs[0]
    rows = []
    for step in range(1, steps + 1):
        worst, offenders = 0.0, []
        missing = [r.spec for r in runs if step not in r.records]
        for run in runs[1:]:
            a, b = run.records.get(step), ref.records.get(step)
            if a is None or b is None:
                continue
            tol = tolerance if tolerance is not None else (DEFAULT_TP_TOLERANCE if run.tp else DEFAULT_TOLERANCE)
            for m in METRICS:
                d = rel_diff(a.get(m), b.get(m))
                worst = max(worst, d)
                if d > tol:
                    offenders.append(f"{run.spec} {m}")
        rows.append(StepRow(step, worst, offenders, missing))
    return rows


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.7g}"


def _table(runs: list[BackendRun], rows: list[StepRow]) -> Any:
    from rich.table import Table

    lrs_agree = all(rel_diff(r.records.get(s.step, {}).get("lr"), runs[0].records.get(s.step, {}).get("lr")) == 0
                    for r in runs if r.records for s in rows)
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("step", justify="right", no_wrap=True)
    for r in runs:
        table.add_column(f"{r.spec}\nloss", justify="right", no_wrap=True)
        table.add_column(f"{r.spec}\ngrad norm", justify="right", no_wrap=True)
        if not lrs_agree:
            table.add_column(f"{r.spec}\nlr", justify="right", no_wrap=True)
    if lrs_agree:
        table.add_column("lr", justify="right", no_wrap=True)
    table.add_column("max rel\ndiff", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for row in rows:
        cells = [str(row.step)]
        for r in runs:
            rec = r.records.get(row.step, {})
            cells += [_fmt(rec.get("loss")), _fmt(rec.get("grad_norm"))] + ([] if lrs_agree else [_fmt(rec.get("lr"))])
        if lrs_agree:
            cells.append(_fmt(runs[0].records.get(row.step, {}).get("lr")))
        cells.append(f"{row.worst:.1e}" if len(runs) - len(row.missing) > 1 else "-")
        verdict = [f"DIVERGES: {', '.join(row.offenders)}"] if row.offenders else []
        verdict += [f"no record: {', '.join(row.missing)}"] if row.missing else []
        cells.append(f"[red]{'; '.join(verdict)}[/red]" if verdict else "[green]ok[/green]")
        table.add_row(*cells)
    return table


def report(runs: list[BackendRun], rows: list[StepRow], args: argparse.Namespace, kept: bool) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: print the table at its natural width
        console = Console(width=1000)
    console.print(_table(runs, rows))
    failed = [r for r in runs if r.error]
    for r in failed:
        where = f" ({r.run_dir.parent / r.run_dir.name}.err)" if kept else " (rerun with --keep for the logs)"
        said = f"; its last output{where}:" if r.tail else f"; no output{where}"
        console.print(f"[red]{r.spec} failed[/red]: {r.error}{said}", highlight=False)
        for line in r.tail:
            console.print(f"  {line}", markup=False, highlight=False)
    bad = [row for row in rows if row.offenders]
    finite = [row.worst for row in rows if math.isfinite(row.worst)]
    worst = f"{max(finite):.1e}" if finite else "-"
    tol = (f"{args.tolerance:g}" if args.tolerance is not None
           else f"{DEFAULT_TOLERANCE:g} ({DEFAULT_TP_TOLERANCE:g} for tp)")
    others = ", ".join(r.spec for r in runs[1:])
    if failed:
        summary = f"parity FAILED: {', '.join(r.spec for r in failed)} did not run to the end"
        if bad:
            summary += f"; differences beyond tolerance from step {bad[0].step} ({', '.join(bad[0].offenders)})"
    elif bad:
        first = bad[0]
        who = sorted({o.rsplit(" ", 1)[0] for row in bad for o in row.offenders})
        summary = (f"parity FAILED: {', '.join(who)} diverge{'s' if len(who) == 1 else ''} from {runs[0].spec} "
                   f"from step {first.step} ({', '.join(first.offenders)}; "
                   f"largest relative difference {worst}, tolerance {tol})")
    else:
        summary = (f"parity ok: {others} agree with {runs[0].spec} over {args.steps} steps "
                   f"(largest relative difference {worst}, tolerance {tol})")
    console.print(summary, highlight=False, markup=False)
    return ExitCode.DAMAGE if failed or bad else ExitCode.OK


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

        def interrupt(signum: int, _frame: Any) -> None:
            raise Interrupted(signal.Signals(signum).name)

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for i, run in enumerate(runs, 1):
                print(f"parity: [{i}/{len(runs)}] {run.spec} ...", file=sys.stderr, flush=True)
                launch(args, run, out)
                state = f"failed ({run.error})" if run.error else "done"
                print(f"parity: [{i}/{len(runs)}] {run.spec} {state} in {run.seconds:.0f}s", file=sys.stderr, flush=True)
        except (Interrupted, KeyboardInterrupt) as e:
            print(f"parity interrupted ({e or 'SIGINT'}); the running backend was stopped", file=sys.stderr)
            return 130
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        code = report(runs, compare(runs, args.steps, args.tolerance), args, kept=not remove)
        if not remove:
            print(f"run folders and logs: {out}", file=sys.stderr)
        return code
    finally:
        if remove:
            shutil.rmtree(out, ignore_errors=True)
