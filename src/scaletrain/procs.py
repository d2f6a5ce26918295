"""Child processes the tools start (sweep trials, parity runs): each in a session of its own, killed
as a group, dying with its parent, and a signal scope that turns SIGTERM/SIGINT/SIGHUP into
`Interrupted`.

`python -m scaletrain.procs train ...` is a worker's entry under torchrun: it ties itself to its
launcher before anything else, then runs the `scaletrain` command. Imports: `scaletrain.errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from typing import Any

from scaletrain.errors import ExitCode


def die_with_parent_fn() -> Any:
    """A preexec_fn that has the kernel SIGKILL the child when the sweep dies (Linux's PR_SET_PDEATHSIG);
    elsewhere None (children then rely on the sweep's own cleanup)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigkill = int(signal.SIGKILL)

    def set_death_signal() -> None:  # runs in the child between fork and exec
        prctl(1, sigkill, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG

    return set_death_signal


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the trial's session (torchrun forwards it to its workers), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Interrupted(Exception):
    pass


def worker_main() -> None:
    """A trial's worker under torchrun: bound to die with its launcher from its first instant, then the
    `scaletrain` command. The loop's own parent watch starts only after torch is imported, seconds
    later; a sweep killed in between would otherwise leave the workers behind, waiting on a dead store."""
    set_death_signal = die_with_parent_fn()
    if set_death_signal is not None:
        set_death_signal()
    if os.getppid() == 1:  # the launcher died before the death signal was armed
        os._exit(ExitCode.LAUNCHER_GONE)
    import runpy

    runpy.run_module("scaletrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    worker_main()
