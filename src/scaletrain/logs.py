"""The one logger tree (`scaletrain.*`), configured once per process by the CLI, and the process's console.

Rank 0 logs through rich at the configured level, on the console `console()` (stdout); the other ranks
speak only at WARNING and above, on stderr, each line naming its rank.

One console: a live display (the training progress bar) keeps the lines printed through its own console
above itself and stays on the last line; anything printed through another console lands on the bar's
line and the bar is drawn again below it. So whatever draws a bar asks `live_console()`, which is the
log console when stdout and stderr both reach a terminal (one screen), and a console of its own on
stderr otherwise (pipes and CI logs: no bar, lines as before). Imports nothing of ours.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_console: Any = None  # the process's rich Console, made on first use


def console() -> Any:
    """The process's console for log lines: one `rich.console.Console` on stdout, made on first use."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


def live_console() -> Any:
    """Where a progress bar and the lines printed with it go: the log console when stdout and stderr are
    both terminals, so log lines print above the bar; else a console on stderr, as it always was."""
    from rich.console import Console

    err = Console(stderr=True)
    shared = console()
    return shared if shared.is_terminal and err.is_terminal else err


def setup_logging(level: str, rank: int) -> None:
    root = logging.getLogger("scaletrain")
    root.handlers.clear()
    root.propagate = False
    if rank == 0:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console(), show_path=False, markup=False,
                                               rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
        root.setLevel(level.upper())
    else:  # other ranks speak only when something is wrong, and say who they are
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
        root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    root.addHandler(handler)
