"""The one logger tree (`scaletrain.*`), configured once per process by the CLI.

Rank 0 logs through rich at the configured level; the other ranks speak only at WARNING and above,
each line naming its rank. Imports nothing of ours.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, rank: int) -> None:
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
