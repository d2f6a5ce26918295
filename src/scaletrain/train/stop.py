"""`StopRequest`: SIGUSR1 (SLURM's warning before preemption) and SIGTERM turned into a clean stop.

The loop finishes the step, saves, and the command exits 75 (requeue me). Installed before anything
slow happens (the CLI does it first), so a signal during start-up is a clean stop too. Only the main
thread may install handlers; elsewhere installing is a no-op. Imports nothing of ours.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True  # a second signal during the save changes nothing

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            # After a stop the process is on its way out with exit 75 and a committed checkpoint. The
            # launcher may SIGTERM the slower ranks once a faster one has exited (srun
            # --kill-on-bad-exit, torchrun); that must not turn a clean stop into a crash.
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()
