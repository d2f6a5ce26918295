"""`scaletrain consolidate CKPT_DIR [--tag] [--out] [--dtype] [--format] [--max-shard-size]`: plain model
weights from any checkpoint. Imports: `scaletrain.checkpoint.consolidate`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from scaletrain.checkpoint.consolidate import _OUT_DTYPES, consolidate, parse_size

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    written = consolidate(
        Path(args.ckpt_dir), tag=args.tag, out=Path(args.out) if args.out else None, dtype=args.dtype,
        fmt=args.format, max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
        force=args.force, verify=args.verify,
    )
    total = sum(p.stat().st_size for p in written)
    shown = written[-1].parent if args.format == "hf" else written[-1]
    print(f"wrote {shown} ({len(written)} file{'s' if len(written) > 1 else ''}, {total / 2**20:.1f} MiB, "
          f"{args.dtype})")
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("consolidate", help="write one file of plain model weights from any checkpoint")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a run's ckpt/ folder, or one tag folder in it")
    p.add_argument("--tag", help="tag to read (default: the one `latest` names)")
    p.add_argument("--out", help="output file (a folder with --max-shard-size or --format hf); "
                   "default <run>/consolidated/<tag>.* (<tag>-hf/ for --format hf)")
    p.add_argument("--dtype", choices=sorted(_OUT_DTYPES), default="fp32", help="dtype of floating tensors")
    p.add_argument("--format", choices=["safetensors", "pt", "hf"], default="safetensors",
                   help="hf: a Hugging Face model folder (config.json + model.safetensors) from_pretrained loads")
    p.add_argument("--max-shard-size", help="split into HF-style shards of at most this size (e.g. 2GB) + index")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--verify", action="store_true", help="re-check every checksum of the tag first")
    p.set_defaults(func=run)
