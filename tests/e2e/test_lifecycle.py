"""A run's life from launch to exit, as the review's items name them: nothing left behind at exit
(item 4), one job per run folder (item 7), a failed stop-save is not a requeue (item 8), workers die
with their launcher (item 11), and a signal during start-up is a clean stop (item 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, child_env, kill_tree, read_metrics, spawn, tiny_overrides, train, train_cmd

FAULTS = {"model.factory": "fault_models:slow_lm"}


def _env(**extra: str) -> dict[str, str]:
    return child_env(PYTHONPATH=str(REPO / "tests"), **extra)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]


# ---------------------------------------------------------------------------------------------
# item 4: when train() returns, no thread, process group or subgroup is left


def _train_in_process(rank: int, world: int, data: str, out: str, extra: list[str]) -> dict:
    import threading

    import torch.distributed as tdist

    from scaletrain import dist
    from scaletrain.config import load_config
    from scaletrain.train.loop import plan_run, train

    before = {t.ident for t in threading.enumerate()}
    cfg = load_config(None, [*tiny_overrides(Path(data), Path(out), **{"train.max_steps": 3}), *extra])
    plan = plan_run(cfg, world)
    ctx = dist.init(dist.current_launch(), timeout_s=60)
    train(plan, ctx)
    leftover = dist.teardown()
    threads = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    return {"native": leftover, "threads": threads, "initialized": tdist.is_initialized()}


@pytest.mark.parametrize("extra", [["backend=fsdp", "backend.fsdp.sharding=hybrid_shard"],
                                   ["backend=fsdp", "backend.fsdp.sharding=no_shard", "checkpoint.async=true"],
                                   ["backend=ddp", "checkpoint.async=true"]],
                         ids=["hybrid_shard", "no_shard-async", "ddp-async"])
def test_item4_nothing_left_when_train_returns(tiny_data: Path, tmp_path: Path, extra: list[str]):
    """Gloo worker threads of a group still referenced after teardown are what aborted finished runs
    (SIGABRT at exit); every group, subgroup and the async-save group must be gone."""
    for result in spawn(_train_in_process, args=(str(tiny_data), str(tmp_path / "r"), extra), timeout=180):
        assert result == {"native": [], "threads": [], "initialized": False}, result


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 50 runs of a few seconds each
@pytest.mark.parametrize("sharding", ["no_shard", "hybrid_shard"])
def test_item4_fifty_runs_exit_cleanly(tiny_data: Path, tmp_path: Path, sharding: str):
    failures = []
    for i in range(50):
        r = train(tiny_overrides(tiny_data, tmp_path / f"r{i}", **{"backend": "fsdp", "backend.fsdp.sharding": sharding,
                                                                     "train.max_steps": 3}), check=False)
        if r.returncode != 0:
            failures.append((i, r.returncode, r.stderr[-500:]))
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# item 7: one job per run folder


def test_item7_second_job_on_a_run_folder_is_refused(tiny_data: Path, tmp_path: Path):
    import json

    out = tmp_path / "run"
    o = tiny_overrides(tiny_data, out, **{**FAULTS, "train.max_steps": 300})
    first = _start(train_cmd(o), _env(SLOW_STEP_S="0.2"))
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text(), 120,
                  "the first job's first step")
        holder = json.loads((out / ".lease.json").read_text())
        alone = train(o, nproc=1, check=False, env=_env())  # python launch/train.py: exit 2, one line
        under_torchrun = train(o, check=False, env=_env())  # torchrun reports any worker failure as 1
        steps = [r["step"] for r in read_metrics(out)]
    finally:
        kill_tree(first.pid)
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr[-2000:]
    assert under_torchrun.returncode != 0
    errors = [ln for ln in under_torchrun.stderr.splitlines() if ln.startswith("error:")]
    same_holder = alone.stderr.split(", heartbeat")[0]
    assert len(errors) == 1 and errors[0].startswith(same_holder), under_torchrun.stderr[-3000:]  # once, not per rank
    line = alone.stderr.strip()
    assert f"is in use by host {holder['host']} pid {holder['pid']}" in line, line
    assert "heartbeat" in line and "choose another run.out_dir" in line
    assert steps == list(range(1, len(steps) + 1))  # the refused jobs wrote no record


def test_item7_lease_rules(tmp_path: Path, monkeypatch):
    """Fresh lease of another job: refused. Stale lease, a lease whose process on this host is gone, or
    one of the same Slurm job (a requeue on another node): taken over. Released: gone."""
    import json

    from scaletrain.train.lease import LEASE_FILE, RunInUseError, RunLock

    lease = tmp_path / LEASE_FILE
    other = {"host": "node7", "pid": 4242, "job_id": "99", "token": "node7:4242:1", "heartbeat": time.time()}
    lease.write_text(json.dumps(other))
    with pytest.raises(RunInUseError, match=r"in use by host node7 pid 4242, Slurm job 99, heartbeat \d+ s ago"):
        RunLock(tmp_path).acquire()
    lease.write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))
    with RunLock(tmp_path) as lock:  # stale: taken over
        assert json.loads(lease.read_text())["token"] == lock.lease["token"]
        with pytest.raises(RunInUseError):
            RunLock(tmp_path).acquire()  # and now held by us
    assert not lease.exists()
    import socket

    dead = {**other, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": -1}  # pid reused since
    lease.write_text(json.dumps(dead))
    with RunLock(tmp_path) as lock:  # fresh heartbeat, but its process on this host is gone: taken over
        assert json.loads(lease.read_text())["token"] == lock.lease["token"]
    alive = {**dead, "pid_start": lock.lease["pid_start"]}  # this very process: alive
    lease.write_text(json.dumps(alive))
    with pytest.raises(RunInUseError):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    lease.write_text(json.dumps(other))
    with RunLock(tmp_path) as lock:  # same job id, fresh heartbeat: a requeued run of this job
        assert json.loads(lease.read_text())["token"] == lock.lease["token"]


def test_item7_heartbeat_renews_the_lease(tmp_path: Path):
    import json

    from scaletrain.train.lease import LEASE_FILE, RunLock

    with RunLock(tmp_path, heartbeat_s=0.05) as lock:
        first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
        _wait_for(lambda: json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first, 5, "a heartbeat")
        assert lock._thread is not None and lock._thread.daemon


# ---------------------------------------------------------------------------------------------
# items 8 and 12: stops by signal


def test_item8_failed_stop_save_exits_74_not_75(tiny_data: Path, tmp_path: Path):
    """Preempted while every save fails (checkpoint.on_error=warn, ckpt/ immutable): exit 74, so the
    sbatch scripts do not requeue a job that would lose its work again."""
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(out / "ckpt")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        o = tiny_overrides(tiny_data, out, **{**FAULTS, "train.max_steps": 40, "checkpoint.every": 2,
                                              "checkpoint.on_error": "warn"})
        proc = _start(train_cmd(o, nproc=1), _env(SLOW_STEP_S="0.2"))  # torchrun would report any code as 1
        try:
            _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3, 120, "3 steps")
            proc.send_signal(signal.SIGUSR1)
            out_text, err = proc.communicate(timeout=120)
        finally:
            kill_tree(proc.pid)
        assert proc.returncode == 74, err[-3000:]
        assert "could NOT save" in " ".join((out_text + err).split())  # rank 0 logs to the console
    finally:
        subprocess.run(["chattr", "-i", str(out / "ckpt")], check=False)


def test_item12_signal_during_startup_is_a_clean_stop(tiny_data: Path, tmp_path: Path):
    """SIGUSR1 while the model is still being built: no traceback, exit 75, no step taken."""
    out = tmp_path / "run"
    o = tiny_overrides(tiny_data, out, **{"model.factory": "fault_models:slow_build_lm"})
    proc = _start(train_cmd(o, nproc=1), _env(SLOW_BUILD_S="4"))
    try:
        _wait_for(lambda: (out / "config.json").is_file(), 120, "start-up")
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").is_file() or read_metrics(out) == []


# ---------------------------------------------------------------------------------------------
# item 11: workers die with their launcher


def test_item11_killed_launcher_takes_its_workers_along(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    o = tiny_overrides(tiny_data, out, **{**FAULTS, "train.max_steps": 200, "checkpoint.every": 1})
    proc = _start(train_cmd(o), _env(SLOW_STEP_S="0.2"))
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 2, 120, "2 steps")
        workers = _workers(proc)
        assert len(workers) == 2
        latest_before = (out / "ckpt" / "latest").read_text()
        os.kill(proc.pid, signal.SIGKILL)  # the agent only: its workers live in sessions of their own
        start = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=10)
        elapsed = time.monotonic() - start
    finally:
        kill_tree(proc.pid)
        for w in _workers(proc) if proc.poll() is None else []:
            w.kill()
    assert not alive, f"workers still running 10 s after the launcher died: {[w.pid for w in alive]}"
    assert elapsed < 10
    latest = (out / "ckpt" / "latest").read_text()
    assert (out / "ckpt" / latest.strip() / "meta.json").is_file()  # latest names a complete tag
    assert latest_before.strip() <= latest.strip()
