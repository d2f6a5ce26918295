"""`scaletrain plot RUN [RUN ...] --out FILE`: training curves of one or more runs in one figure.
Imports: `scaletrain.errors`, `scaletrain.train.plot`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scaletrain.errors import ConfigError
from scaletrain.train.plot import plot_runs


def run(args: argparse.Namespace) -> int:
    run_dirs = [Path(d) for d in args.run_dirs]
    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"plot: --smooth {args.smooth} is outside [0, 1); use e.g. 0.9")
    out = Path(args.out) if args.out else (run_dirs[0] / "curves.png" if len(run_dirs) == 1 else Path("curves.png"))
    print(f"wrote {plot_runs(run_dirs, out, smoothing=args.smooth)}")
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("plot", help="draw loss, val loss, LR, grad norm and tokens/s of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA smoothing of the train loss, in [0, 1)")
    p.set_defaults(func=run)
