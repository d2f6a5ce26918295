"""Launching without Slurm: two torchrun agents as two "nodes" on localhost, a rank that crashes
(every rank must exit, non-zero, within a bound, and the error must name the failing rank), and a bad
input reported once rather than once per rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import BIN, REPO, TRAIN, child_env, free_port, read_metrics, tiny_overrides, train

EXIT_BOUND_S = 30.0  # from the injected fault until the last process is gone


def run_together(
    cmds: list[list[str]], env: dict[str, str] | list[dict[str, str]], timeout: float = 240
) -> list[tuple[int, str, float]]:
    """Start every command at once (own process groups); (exit code, stderr, exit time) per command.
    On timeout every group is killed and the test fails."""
    envs = env if isinstance(env, list) else [env] * len(cmds)
    procs = [
        subprocess.Popen(
            c,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=e,
            start_new_session=True,
        )
        for c, e in zip(cmds, envs)
    ]
    errs: list[str] = []
    ends: list[float] = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"timed out after {timeout}s: {p.args}") from None
            errs.append(err)
            ends.append(time.time())
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, e, t) for p, e, t in zip(procs, errs, ends)]


def test_two_torchrun_agents_make_one_job(tiny_data: Path, tmp_path: Path):
    """The multi-node recipe on one host: --nnodes=2, one process per agent, c10d rendezvous."""
    port = free_port()
    o = tiny_overrides(tiny_data, tmp_path / "run")
    cmds = [
        [
            str(BIN / "torchrun"),
            "--nnodes=2",
            f"--node_rank={n}",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two-agents",
            "--max_restarts=0",
            TRAIN,
            *o,
        ]
        for n in (0, 1)
    ]
    results = run_together(cmds, child_env())
    for rc, err, _ in results:
        assert rc == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "step_00000006"


def _crash_overrides(tiny_data: Path, run: Path) -> list[str]:
    return tiny_overrides(
        tiny_data,
        run,
        **{"model.factory": "fault_models:crash_lm", "train.max_steps": 8, "backend.timeout_s": 20},
    )


def _crash_env(mark: Path, **extra: str) -> dict[str, str]:
    return child_env(
        PYTHONPATH=str(REPO / "tests"), FAULT_RANK="1", FAULT_STEP="3", FAULT_MARK=str(mark), **extra
    )


def _assert_failed_fast(results: list[tuple[int, str, float]], mark: Path) -> None:
    fault_time = float(mark.read_text())
    everything = "\n".join(err for _, err, _ in results)
    assert all(rc != 0 for rc, _, _ in results), everything[-3000:]
    assert "rank 1 failed: RuntimeError: injected fault on rank 1" in everything, everything[-3000:]
    assert max(t for _, _, t in results) - fault_time < EXIT_BOUND_S


def test_crash_on_one_rank_ends_torchrun_job(tiny_data: Path, tmp_path: Path):
    mark = tmp_path / "fault"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        TRAIN,
        *_crash_overrides(tiny_data, tmp_path / "r"),
    ]
    _assert_failed_fast(run_together([cmd], _crash_env(mark)), mark)


def test_crash_on_one_rank_ends_plain_env_launch(tiny_data: Path, tmp_path: Path):
    """No launcher to tear the job down: the survivor must fail on its own (a broken connection, or at
    worst backend.timeout_s), not wait forever."""
    mark, port = tmp_path / "fault", free_port()
    envs = [
        _crash_env(
            mark,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        for r in (0, 1)
    ]
    cmd = [sys.executable, TRAIN, *_crash_overrides(tiny_data, tmp_path / "r")]
    _assert_failed_fast(run_together([cmd, cmd], envs), mark)


def test_bad_input_is_reported_once_not_per_rank(tiny_data: Path, tmp_path: Path):
    r = train([*tiny_overrides(tiny_data, tmp_path / "r"), "optim.lrr=1"], nproc=2, check=False, timeout=120)
    assert r.returncode != 0
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        next(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
    ]


def test_stop_signal_twice_saves_once_and_exits_75(tiny_data: Path, tmp_path: Path):
    """SIGUSR1 then SIGTERM to every worker while it runs: one intact checkpoint, exit 75 from each rank,
    and a rerun with the same arguments resumes from it and finishes."""
    run = tmp_path / "run"
    o = tiny_overrides(tiny_data, run, **{"model.factory": "fault_models:slow_lm", "train.max_steps": 30})
    env = child_env(PYTHONPATH=str(REPO / "tests"), SLOW_STEP_S="0.1")
    port, nproc = free_port(), 2
    procs = [
        subprocess.Popen(
            [sys.executable, TRAIN, *o],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
            env={
                **env,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(nproc)
    ]
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no steps"
            time.sleep(0.05)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            for p in procs:
                p.send_signal(sig)
            time.sleep(0.05)
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [75] * nproc, errs[0][-2000:] + errs[-1][-2000:]
    saved = int((run / "ckpt" / "latest").read_text().strip().split("_")[1])
    assert 3 <= saved < 30 and [r["step"] for r in read_metrics(run)] == list(range(1, saved + 1))
    train(o, nproc=2, env=child_env(PYTHONPATH=str(REPO / "tests"), SLOW_STEP_S="0"))
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))
