"""The `scaletrain` command: train | config show | prepare | consolidate | convert | inspect | plan | parity |
sweep | plot (one module each in `scaletrain.commands`).

Exit codes are `scaletrain.errors.ExitCode`: 0 done; 1 damage found; 2 bad input (one line on stderr:
what, and how to fix it); 74 stopped by a signal but the stop-save failed; 75 stopped by a signal
after saving a checkpoint (requeue or run again to resume); anything else is a crash and keeps its
traceback. Configures logging once. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from scaletrain.errors import ExitCode, ScaletrainError

log = logging.getLogger("scaletrain")

def build_parser() -> argparse.ArgumentParser:
    from scaletrain.commands import (
        config,
        consolidate,
        convert,
        inspect,
        parity,
        plan,
        plot,
        prepare,
        sweep,
        train,
    )

    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `scaletrain --help` lists them; each module adds its own subcommand.
    for command in (train, config, prepare, consolidate, convert, inspect, plan, parity, sweep, plot):
        command.add_command(sub)
    return parser


def _flags_without_value(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, in any subcommand, that takes no value (store_true, --help, ...)."""
    flags: set[str] = set()
    for action in parser._actions:
        if action.nargs == 0:
            flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags_without_value(sub)
    return flags


def _overrides_last(argv: list[str], no_value: set[str] = frozenset()) -> list[str]:
    """Move `key=value` tokens after every option, so `train a=1 --ds f.json b=2` parses like
    `train --ds f.json a=1 b=2` (argparse takes one run of positionals only). A token right after an
    option that takes a value is that option's value; after a flag in `no_value` it is not."""
    keep, moved = [], []
    for i, tok in enumerate(argv):
        prev = argv[i - 1] if i > 0 else ""
        after_option = prev.startswith("--") and "=" not in prev and prev not in no_value
        (moved if "=" in tok and not tok.startswith("-") and not after_option else keep).append(tok)
    return keep + moved


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_overrides_last(list(sys.argv[1:] if argv is None else argv),
                                             _flags_without_value(parser)))
    try:
        return args.func(args)
    except ScaletrainError as e:
        rank = getattr(args, "pre_init_rank", None)
        if e.agreed:
            rank = getattr(args, "rank", rank)
        if rank:  # rank 0 prints the same line
            log.debug("rank %d: error: %s", rank, e)
        else:
            print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
