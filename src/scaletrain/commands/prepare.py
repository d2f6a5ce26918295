"""`scaletrain prepare [TEXT_FILE_OR_DIR ...] --out DIR`: text to token files (the built-in corpus when no
input is given). Imports: `scaletrain.data.prepare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scaletrain.data.prepare import prepare


def run(args: argparse.Namespace) -> int:
    meta = prepare(
        [Path(p) for p in args.inputs], Path(args.out), max_bytes=args.max_bytes, force=args.force,
        tokenizer=args.tokenizer, train_vocab=args.train_tokenizer, text_field=args.text_field, progress=True,
    )
    print(
        f"prepared {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"(vocab {meta['vocab_size']}, {meta['dtype']}) from {meta['source_files']} files"
    )
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare", help="tokenise text into train.bin/val.bin/meta.json")
    p.add_argument("inputs", nargs="*",
                   help="text files or folders, or .jsonl/.parquet/.csv files (default: the built-in corpus)")
    p.add_argument("--out", required=True, help="output data folder")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="a HuggingFace tokenizer.json, or a model folder holding one (default: bytes, vocab 256)")
    g.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this vocabulary size on the input first")
    p.add_argument("--text-field", metavar="NAME", help="the text column of .jsonl/.parquet/.csv inputs")
    p.set_defaults(func=run)
