"""`scaletrain convert CKPT --to SPEC [--world N] [--out DIR]`: a tag rewritten for another backend and
world size. Imports: `scaletrain.engines` (`convert`, `registry`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from scaletrain.engines.convert import convert

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    written = convert(Path(args.ckpt), args.to, world=args.world, out=Path(args.out) if args.out else None)
    print(f"wrote {written}; resume with checkpoint.resume={written.parent}")
    return 0


def add_command(subparsers: Any) -> None:
    from scaletrain.engines.registry import SPEC_HELP

    p = subparsers.add_parser("convert", help="rewrite a checkpoint tag for another backend and world size, "
                                              "optimizer state included")
    p.add_argument("ckpt", metavar="CKPT", help="a tag folder, or a run's ckpt/ folder (the tag `latest` names)")
    p.add_argument("--to", required=True, metavar="SPEC", help=f"target backend: {SPEC_HELP}")
    p.add_argument("--world", type=int, help="processes the run will resume on (needed for deepspeed targets; "
                                             "torch-native tags reshard to any world)")
    p.add_argument("--out", help="ckpt folder to write into (default <run>/converted/<spec>-w<N>/)")
    p.set_defaults(func=run)
