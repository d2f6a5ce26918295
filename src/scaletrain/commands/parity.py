"""`scaletrain parity --backends SPEC,SPEC,...`: the same short run on several backends, compared step
by step. Imports: `scaletrain.engines.registry`, `scaletrain.experiments.parity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaletrain.engines.registry import SPEC_HELP
from scaletrain.experiments.parity import DEFAULT_TOLERANCE, DEFAULT_TP_TOLERANCE, run_parity


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("parity", help="run the same steps on several backends and compare losses, "
                                             "gradient norms and learning rates")
    p.add_argument("--config", type=Path, help="TOML/JSON/YAML config shared by every backend")
    p.add_argument("--backends", required=True, metavar="SPEC,SPEC,...",
                   help=f"comma-separated backend specs, the first is the reference: {SPEC_HELP}")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per backend (default 10)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"relative tolerance for every backend (default {DEFAULT_TOLERANCE:g}, "
                        f"{DEFAULT_TP_TOLERANCE:g} for tp:N specs)")
    p.add_argument("--override", action="append", default=[], metavar="SPEC:key=value",
                   help="a config override for one backend, e.g. fsdp:optim.lr=2e-3 (repeatable)")
    p.add_argument("--out", type=Path, help="folder for the run folders and logs (kept; default: a temporary "
                                            "folder, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print where it is")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one backend's run may take (default 1800)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every backend")
    p.set_defaults(func=run_parity)
