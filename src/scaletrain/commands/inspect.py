"""`scaletrain inspect CKPT_DIR [--verify]`: a table of the tags in a checkpoint folder.

Exit codes: 0 all listed tags intact; 1 `--verify` found a damaged or incomplete tag (the table and a
line per damaged file say which); 2 bad input (no such folder). Runs in one process, no torch.
Imports: rich, `scaletrain.checkpoint` (`inspect`, `layout`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from scaletrain.checkpoint.inspect import _pointer_problems, scan

EXIT_DAMAGED = 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(ckpt_dir: Path, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=str(ckpt_dir), title_justify="left")
    for col in ("tag", "step", "backend", "world", "precision", "format", "size", "saved", "val loss", "state", ""):
        table.add_column(col, justify="right" if col in ("step", "world", "size", "val loss") else "left", no_wrap=True)
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S") if r["created"] else "-"
        state = ("verified" if r["verified"] else "intact") if r["intact"] else "[red]DAMAGED[/red]"
        marks = " ".join(m for m in ("latest", "best") if r[m])
        table.add_row(
            r["tag"], str(r["step"]), r["backend"] or "-", str(r["world_size"] or "-"), r["precision"] or "-",
            r["format"] or "-", _human(r["bytes"]), when, "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
            state, marks,
        )
    return table


def run(args: argparse.Namespace) -> int:
    ckpt_dir = Path(args.ckpt_dir)
    rows = scan(ckpt_dir, verify=args.verify)
    pointer_problems = _pointer_problems(ckpt_dir, rows)
    if args.json:
        print(json.dumps({"tags": rows, "pointer_problems": pointer_problems}, indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
            console = Console(width=160)
        console.print(_table(ckpt_dir, rows) if rows else f"{ckpt_dir}: no checkpoint tags")
        for r in rows:
            for problem in r["problems"]:
                console.print(f"[red]{r['tag']}[/red]: {problem}", highlight=False)
        for problem in pointer_problems:
            console.print(f"[yellow]{problem}[/yellow]", highlight=False)
    damaged = [r["tag"] for r in rows if not r["intact"]]
    if args.verify and damaged:
        print(f"damaged or incomplete: {', '.join(damaged)}", file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="list a checkpoint folder's tags; --verify re-checks checksums")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a run's ckpt/ folder")
    p.add_argument("--verify", action="store_true",
                   help=f"re-compute every sha256; exit {EXIT_DAMAGED} when any tag is damaged or incomplete")
    p.add_argument("--json", action="store_true", help="machine-readable output instead of the table")
    p.set_defaults(func=run)
