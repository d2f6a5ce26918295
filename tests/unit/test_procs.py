"""`scaletrain.procs`: a child in a session of its own is stopped as a group (with grace, then SIGKILL),
the signal scope puts the previous handlers back, and a child tied to its parent dies when the parent
is SIGKILLed (started by `start_child`, or a spawn process that called `tie_to_parent`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scaletrain.errors import ExitCode
from scaletrain.procs import Interrupted, free_port, interrupt_scope, kill_group, start_child

psutil = pytest.importorskip("psutil")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _alive(pid: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _read_pids(proc: subprocess.Popen, n: int) -> list[int]:
    pids = []
    for _ in range(n):
        line = proc.stdout.readline()
        assert line, "the child ended before it said its pids"
        pids.append(int(line))
    return pids


def test_a_child_in_its_own_session_is_killed_as_a_group():
    # The shell starts a grandchild in the same session; killing the shell alone would leave it behind.
    proc = start_child(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = _read_pids(proc, 1)[0]
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # a session (and group) of its own
        kill_group(proc, grace_s=5)
        assert proc.returncode is not None
        assert not _wait_gone([grandchild]), "the grandchild outlived its group"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kill_group_escalates_to_sigkill_after_the_grace():
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    proc = start_child([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        _read_pids(proc, 1)  # SIGTERM is ignored from here on
        t0 = time.monotonic()
        kill_group(proc, grace_s=0.5)
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - t0 < 10
        kill_group(proc)  # an exited child is left alone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_signal_scope_raises_interrupted_and_restores_the_previous_handlers():
    def mine(signum, frame):  # pragma: no cover - never delivered
        raise AssertionError("the scope's handler should have run")

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Interrupted, match="SIGTERM"), interrupt_scope():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode; never reached
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        assert signal.getsignal(signal.SIGHUP) is before[signal.SIGHUP]
        with interrupt_scope([signal.SIGHUP]):  # a normal exit restores too
            assert signal.getsignal(signal.SIGHUP) is not before[signal.SIGHUP]
        assert signal.getsignal(signal.SIGHUP) is before[signal.SIGHUP]
    finally:
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])


PARENT = """
import multiprocessing as mp, os, sys, time
sys.path.insert(0, {here!r})
from scaletrain.procs import start_child
import tied

if __name__ == "__main__":
    child = start_child([sys.executable, "-c", "import time; time.sleep(60)"])
    spawned = mp.get_context("spawn").Process(target=tied.main, args=(os.getpid(),))
    spawned.start()
    print(child.pid, flush=True)
    print(spawned.pid, flush=True)
    time.sleep(60)
"""
TIED = """
import os, sys, time
from scaletrain.procs import tie_to_parent

def main(parent):
    tie_to_parent(parent, new_session=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_children_tied_to_their_parent_die_when_it_is_sigkilled(tmp_path: Path):
    (tmp_path / "tied.py").write_text(textwrap.dedent(TIED))
    (tmp_path / "parent.py").write_text(textwrap.dedent(PARENT.format(here=str(tmp_path))))
    env = {**os.environ, "PYTHONPATH": SRC}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    pids = []
    try:
        pids = _read_pids(parent, 2)
        time.sleep(0.5)  # the spawn child arms its death signal once its bootstrap is done
        assert all(_alive(p) for p in pids)
        assert os.getsid(pids[1]) == pids[1]  # new_session: the spawned child leads a session of its own
        parent.kill()
        parent.wait()
        assert not _wait_gone(pids), "a child outlived its SIGKILLed parent"
    finally:
        for pid in [parent.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_tie_to_parent_exits_at_once_when_the_parent_is_already_gone():
    # The pid it was told is not its parent any more: the parent died before the death signal was armed.
    code = "from scaletrain.procs import tie_to_parent; tie_to_parent(1); print('still here')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == ExitCode.LAUNCHER_GONE and "still here" not in r.stdout, r.stderr


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
