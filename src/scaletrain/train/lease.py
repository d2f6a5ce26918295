"""One job per run folder: an exclusive lease held for the run's lifetime.

Two jobs on one `run.out_dir` (a double `sbatch`, array tasks sharing a folder) would delete each
other's in-progress saves and both rewrite `latest`. `flock` is not enough: it is missing or advisory
on the shared file systems clusters use (NFS, Lustre), and it dies with the node. So the lock is a
lease file, `<run_dir>/.lease.json`, holding the holder's host, pid, Slurm job id and a heartbeat
that a daemon thread renews every `HEARTBEAT_S` seconds:

- created with O_CREAT | O_EXCL (atomic on local disks, NFSv3+ and Lustre);
- another holder with a fresh heartbeat: refused at once, with one line naming it;
- a lease whose heartbeat is older than `STALE_AFTER_S` (a crashed or killed job) is taken over,
  at once when the holder ran on this host and its process is gone (pid and start time checked);
- a lease of the same Slurm job id is taken over at once: a requeued job restarts, possibly on
  another node, only after its previous run ended (Slurm guarantees it), so that holder is gone;
- released (deleted) when the run ends; a crash leaves it to go stale.

Takeover writes a new lease through rename and reads it back after a short pause, so of two jobs
taking over the same stale lease one wins and the other is refused. Imports: `scaletrain.errors`,
`scaletrain.io`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from scaletrain.errors import ScaletrainError
from scaletrain.io import write_atomic

log = logging.getLogger(__name__)

LEASE_FILE = ".lease.json"
HEARTBEAT_S = 15.0  # how often the holder renews its lease
STALE_AFTER_S = 120.0  # a lease not renewed for this long belongs to a dead job (8 missed renewals)


class RunInUseError(ScaletrainError):
    """Another live job holds the run folder. Identical on every rank (agreed before raising)."""

    agreed = True


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), or None if there is no such process.
    With the pid it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid()),
            "job_id": os.environ.get("SLURM_JOB_ID"), "token": f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"}


def _dead_here(held: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (or the pid now names another process): no
    need to wait for its heartbeat to go stale after a kill."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    return held.get("pid_start") is None or _start_ticks(held["pid"]) != held.get("pid_start")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_replace(path: Path, lease: dict[str, Any]) -> None:
    """Through a rename (`scaletrain.io.write_atomic`): of two jobs taking over at once the last rename
    wins whole, and a reader never sees half a lease."""
    write_atomic(path, json.dumps(lease))


def describe(lease: dict[str, Any], now: float) -> str:
    job = f", Slurm job {lease['job_id']}" if lease.get("job_id") else ""
    age = now - float(lease.get("heartbeat", 0))
    return f"host {lease.get('host')} pid {lease.get('pid')}{job}, heartbeat {age:.0f} s ago"


def _refusal(path: Path, held: dict[str, Any], now: float, stale_after_s: float) -> RunInUseError:
    return RunInUseError(
        f"run.out_dir: {path.parent} is in use by {describe(held, now)}; wait for that job to end "
        f"or choose another run.out_dir (a lease not renewed for {stale_after_s:.0f} s is taken over)"
    )


def _held_by_other(held: dict[str, Any] | None, now: float, stale_after_s: float) -> bool:
    """A fresh lease of another live job (a lease of this Slurm job belongs to a requeued run of it)."""
    if held is None or now - float(held.get("heartbeat", 0)) >= stale_after_s or _dead_here(held):
        return False
    job = os.environ.get("SLURM_JOB_ID")
    return not (job and held.get("job_id") == job)


def check_free(run_dir: Path, *, stale_after_s: float = STALE_AFTER_S) -> None:
    """Local, read-only: raise RunInUseError if another live job holds `run_dir`. Every rank can run it
    before the process group exists (same file, same answer), so the refusal is one line from rank 0;
    `RunLock.acquire` after start-up closes the window between two jobs starting together."""
    path = Path(run_dir) / LEASE_FILE
    held, now = _read(path), time.time()
    if _held_by_other(held, now, stale_after_s):
        raise _refusal(path, held, now, stale_after_s)


class RunLock:
    """The lease on one run folder. `acquire` (local) then `release`; usable as a context manager."""

    def __init__(self, run_dir: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LEASE_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lease = {**_identity(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise RunInUseError naming the holder. Starts the heartbeat thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease["heartbeat"] = time.time()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.lease))
        self._thread = threading.Thread(target=self._beat, name="scaletrain-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        now = time.time()
        held = _read(self.path)
        if _held_by_other(held, now, self.stale_after_s):
            raise _refusal(self.path, held, now, self.stale_after_s)
        same_job = held is not None and held.get("job_id") and held.get("job_id") == self.lease["job_id"]
        why = ("the same Slurm job, requeued" if same_job else "its process is gone" if held and _dead_here(held)
               else "stale" if held else "unreadable")
        log.warning("run.out_dir: taking over the lease of %s (%s)", describe(held or {}, now), why)
        _write_replace(self.path, self.lease)
        time.sleep(0.2)  # another job taking over at the same moment: the last rename wins, the other sees it
        won = _read(self.path)
        if not won or won.get("token") != self.lease["token"]:
            raise RunInUseError(f"run.out_dir: {self.path.parent} was just taken by "
                                f"{describe(won or {}, time.time())}; choose another run.out_dir")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read(self.path)
            if current is not None and current.get("token") != self.lease["token"]:
                log.error("run.out_dir: the lease on %s was taken by %s; this job will not renew it",
                          self.path.parent, describe(current, time.time()))
                return
            self.lease["heartbeat"] = time.time()
            try:
                _write_replace(self.path, self.lease)
            except OSError as e:  # a full or flaky disk: keep training, the next beat tries again
                log.warning("run.out_dir: cannot renew the lease %s (%s)", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = _read(self.path)
        if current is not None and current.get("token") == self.lease["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
