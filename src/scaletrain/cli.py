"""The `scaletrain` command: train | prepare | consolidate | inspect | convert | plan | parity | sweep |
plot | config show (subcommands other than train and config live beside their code: COMMAND_MODULES).

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
from pathlib import Path

from scaletrain.errors import ExitCode, ScaletrainError

log = logging.getLogger("scaletrain")

# Subcommands that live beside the code they drive; each module defines `add_command(subparsers)`.
COMMAND_MODULES = (
    "scaletrain.checkpoint.consolidate",
    "scaletrain.checkpoint.convert",
    "scaletrain.checkpoint.inspect",
    "scaletrain.prepare",
    "scaletrain.sweep",
    "scaletrain.plot",
    "scaletrain.parity",
    "scaletrain.planner",
)


def _setup_logging(level: str, rank: int) -> None:
    root = logging.getLogger("scaletrain")
    root.handlers.clear()
    root.propagate = False
    if rank == 0:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
        root.setLevel(level.upper())
    else:  # other ranks speak only when something is wrong, and say who they are
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
        root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    root.addHandler(handler)


def _cmd_train(args: argparse.Namespace) -> int:
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.loop import StopRequest, plan_run, train

    stop = StopRequest().install()  # first: a SIGUSR1/SIGTERM during start-up is a clean stop too
    launch = dist.current_launch(sys.argv)
    dist.maybe_watch_parent(launch)
    # Until the process group exists every rank runs the same checks on the same input, so a bad input
    # fails identically everywhere: `main` lets rank 0 alone print it.
    args.pre_init_rank = launch.rank
    cfg = load_config(args.config, args.overrides, ds_config=args.ds)
    _setup_logging(cfg.logging.level, launch.rank)
    plan = plan_run(cfg, launch.world_size)  # all input checks, before any process group
    ctx = dist.init(launch, timeout_s=cfg.backend.timeout_s)
    args.pre_init_rank = None  # from here on an error may be this rank's alone: every rank reports
    args.rank = ctx.rank  # ... except errors the ranks agreed on, which rank 0 alone prints
    try:
        result = train(plan, ctx, stop=stop)
    except BaseException as e:
        if not isinstance(e, (ScaletrainError, KeyboardInterrupt)):
            log.error("rank %d failed: %s: %s", ctx.rank, type(e).__name__, e)
        raise
    finally:
        leftover = dist.teardown()
    code = ExitCode.OK
    if result.preempted:
        code = ExitCode.PREEMPTED if result.stop_saved else ExitCode.STOP_UNSAVED
    if leftover:
        _exit_now(code, leftover)
    return code


def _exit_now(code: int, threads: list[str]) -> None:
    """Exit without interpreter finalisation, after everything of ours is flushed and closed.

    Only when communication threads outlive `dist.teardown`: a process group someone else still
    references (deepspeed 0.19.8 keeps the groups it creates; torch-native runs leave none) would be
    torn down during finalisation, where gloo aborts the process (SIGABRT) after a completed run.
    The checkpoint is committed and the process group destroyed by now, so nothing is lost.
    """
    import os

    log.debug("%d communication threads outlive the process group (%s); exiting without finalisers",
              len(threads), ", ".join(sorted(set(threads))))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def _cmd_config_show(args: argparse.Namespace) -> int:
    from scaletrain.config import config_to_toml, load_config

    cfg = load_config(args.config, args.overrides, ds_config=args.ds)
    if args.json:
        import json

        print(json.dumps(cfg.to_json_dict(), indent=2))
    else:
        print(config_to_toml(cfg), end="")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML/JSON/YAML config file")
    from scaletrain.engines.registry import DS_FLAG_HELP

    p.add_argument("--ds", type=Path, help=DS_FLAG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (under torchrun, deepspeed, srun, or alone)")
    _add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=_cmd_config_show)

    import importlib

    for name in COMMAND_MODULES:  # each module adds its own subcommand: add_command(subparsers)
        importlib.import_module(name).add_command(sub)
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
