"""What `scaletrain parity` compares and how it reports: one `BackendRun` per backend (its overrides,
its run folder and, after the run, its metric records), the step-by-step comparison with the first
backend listed, and the table and verdict.

A difference is relative, |a - b| / max(|a|, |b|), for each of `METRICS`; a step is fine when every
backend is within its tolerance of the reference (`DEFAULT_TOLERANCE`, `DEFAULT_TP_TOLERANCE` for
tensor-parallel specs, whose matrix products sum in another order). Exit codes: 0 all agree; 1 a
backend diverges or failed to run. Imports: rich (lazily), `scaletrain.errors`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.errors import ExitCode

DEFAULT_TOLERANCE = 1e-4
DEFAULT_TP_TOLERANCE = 1e-3
METRICS = ("loss", "grad_norm", "lr")


@dataclass
class BackendRun:
    spec: str  # as the user wrote it
    overrides: list[str]  # every override of this run, in order: the user's, the spec's, parity's, --override's
    run_dir: Path
    tp: bool
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # why the run failed, when it did
    tail: list[str] = field(default_factory=list)
    seconds: float = 0.0


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
