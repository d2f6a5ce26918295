"""Child processes: the one place that starts them, ties them to their parent, stops them, and lends
them a port.

- `start_child` runs a command in a session of its own (so it and everything it starts can be signalled
  as one group) that the kernel kills when this process dies (Linux's PR_SET_PDEATHSIG);
- `tie_to_parent` does the same from inside a child that was not started by `start_child`
  (multiprocessing's spawn processes, torchrun's workers);
- `kill_group` stops a child's session with grace: SIGTERM, then SIGKILL what is left;
- `interrupt_scope` turns SIGTERM/SIGINT/SIGHUP into `Interrupted` for a block, then puts the previous
  handlers back;
- `free_port` is a free TCP port on 127.0.0.1 for a local rendezvous.

Users: the sweep's trials, parity's runs, `scaletrain convert`'s processes, `dist.init` alone.
`python -m scaletrain.procs train ...` is a worker's entry under torchrun: it ties itself to its
launcher before anything else, then runs the `scaletrain` command. Imports: `scaletrain.errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from scaletrain.errors import ExitCode

INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
    """A signal of `interrupt_scope` arrived; the message is the signal's name."""


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children rely on their parent's own cleanup
        return None


def die_with_parent_fn() -> Any:
    """A preexec_fn that has the kernel SIGKILL the child when its parent dies (Linux's PR_SET_PDEATHSIG);
    elsewhere None. The death signal follows the parent *thread* that started the child."""
    prctl = _prctl()
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def set_death_signal() -> None:  # runs in the child between fork and exec
        prctl(1, sigkill, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG

    return set_death_signal


def tie_to_parent(parent_pid: int | None = None, *, new_session: bool = False) -> None:
    """From inside a child: die (SIGKILL) when the parent dies, and exit at once if it is gone already.

    `parent_pid` is the pid the parent had (a child cannot tell it from the orphan's new parent
    otherwise; without it only a re-parenting to init counts). `new_session`: leave the parent's
    session first, so that `kill_group` reaches this child and whatever it starts."""
    if new_session:
        with contextlib.suppress(PermissionError):  # already a session leader
            os.setsid()
    set_death_signal = die_with_parent_fn()
    if set_death_signal is not None:
        set_death_signal()
    ppid = os.getppid()
    if (ppid != parent_pid) if parent_pid is not None else ppid == 1:  # died before the signal was armed
        os._exit(ExitCode.LAUNCHER_GONE)


def start_child(cmd: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(cmd, **popen_kwargs)` in a session of its own, killed when this process dies.
    Stop it with `kill_group`."""
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=die_with_parent_fn(), **popen_kwargs)


def _exited(child: Any, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a Popen or a multiprocessing Process; True when it has exited."""
    if isinstance(child, subprocess.Popen):
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    child.join(timeout=timeout)
    return child.exitcode is not None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # not (yet) the leader of a group of its own: the process alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def kill_group(child: Any, grace_s: float = 10.0) -> None:
    """SIGTERM the child's session (torchrun forwards it to its workers), then SIGKILL what is left after
    `grace_s`. `child`: a `subprocess.Popen` or a `multiprocessing` Process; one that has exited is left."""
    if _exited(child, 0):
        return
    _signal_group(child.pid, signal.SIGTERM)
    if not _exited(child, grace_s):
        _signal_group(child.pid, signal.SIGKILL)
        _exited(child, 60)


def stop_children(children: Sequence[Any], *, wait_s: float, grace_s: float = 1.0) -> None:
    """Give `children` up to `wait_s` seconds in all to exit on their own, then `kill_group` each."""
    deadline = time.monotonic() + wait_s
    for child in children:
        _exited(child, max(deadline - time.monotonic(), 0))
    for child in children:
        kill_group(child, grace_s)


@contextlib.contextmanager
def interrupt_scope(signals: Sequence[int] = INTERRUPT_SIGNALS) -> Iterator[None]:
    """Inside the block each of `signals` raises `Interrupted(<signal name>)` in the main thread; the
    handlers that were there before are restored on the way out, whatever happens."""

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may take it before it is used: bind soon)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_main() -> None:
    """A trial's worker under torchrun: bound to die with its launcher from its first instant, then the
    `scaletrain` command. The loop's own parent watch starts only after torch is imported, seconds
    later; a sweep killed in between would otherwise leave the workers behind, waiting on a dead store."""
    tie_to_parent()
    import runpy

    runpy.run_module("scaletrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    worker_main()
