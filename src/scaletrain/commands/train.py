"""`scaletrain train [--config FILE] [--ds FILE] [key=value ...]`: one rank of a training run, under
torchrun, the deepspeed launcher, srun, or alone (what `launch/train.py` runs).

Every rank runs the same checks on the same input before the process group exists, so a bad input fails
identically everywhere and rank 0 alone prints it (`args.pre_init_rank`); after that an error may be
one rank's own, except errors the ranks agreed on (`ScaletrainError.agreed`), which rank 0 alone prints.
Imports: `scaletrain.commands.config`, `scaletrain.config`, `scaletrain.dist`, `scaletrain.errors`,
`scaletrain.logs`, `scaletrain.train.loop`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from scaletrain.commands.config import add_config_args
from scaletrain.errors import ExitCode, ScaletrainError
from scaletrain.logs import setup_logging

log = logging.getLogger("scaletrain")


def run(args: argparse.Namespace) -> int:
    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.train.loop import StopRequest, plan_run, train

    stop = StopRequest().install()  # first: a SIGUSR1/SIGTERM during start-up is a clean stop too
    launch = dist.current_launch(sys.argv)
    dist.maybe_watch_parent(launch)
    # Until the process group exists every rank runs the same checks on the same input, so a bad input
    # fails identically everywhere: `main` lets rank 0 alone print it.
    args.pre_init_rank = launch.rank
    cfg = load_config(args.config, args.overrides, ds_config=args.ds)
    setup_logging(cfg.logging.level, launch.rank)
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



def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train (under torchrun, deepspeed, srun, or alone)")
    add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
