"""The sbatch scripts on a real one-node Slurm cluster (launch/slurm/local_cluster.sh), 2 tasks.

The session fixture starts the cluster (and stops it at the end if it started it); every test skips,
with the reason, where Slurm cannot run here: not root, packages missing, a daemon that fails.
Jobs are submitted with `sbatch --parsable` and polled with `scontrol show job` every 0.25 s (what
`sbatch --wait` does, with its poll interval growing to tens of seconds), under a hard timeout that
cancels the job. A requeued job waits `cred_expire` (10 s on the local cluster) before it restarts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, child_env, losses, read_metrics, tiny_overrides

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
STATE = Path(os.environ.get("SCALETRAIN_SLURM_DIR", "/var/lib/scaletrain-slurm"))
# name -> (script, SCALETRAIN_DS_CONFIG): "srun" runs deepspeed.sbatch's srun tasks with DDP, the
# same training as the torchrun job, so its losses compare with that job's.
SETUPS = {
    "torchrun": ("launch/slurm/torchrun.sbatch", ""),
    "srun": ("launch/slurm/deepspeed.sbatch", ""),
    "deepspeed": ("launch/slurm/deepspeed.sbatch", "ds_configs/zero2.json"),
}
REFERENCE = {"torchrun": "torchrun", "srun": "torchrun", "deepspeed": "deepspeed"}
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _cluster(cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCALETRAIN_SLURM_DIR": str(STATE)}
    return subprocess.run(
        ["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """Environment for client commands and jobs on the local cluster; skips where it cannot start."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("Slurm tests need root on Linux (the local cluster's daemons run as root)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("Slurm packages missing: run `bash launch/slurm/local_cluster.sh install` (apt-get)")
    was_up = _cluster("status").returncode == 0
    if not was_up:
        r = _cluster("start")
        if r.returncode != 0:
            pytest.skip(f"local Slurm cluster did not start: {(r.stderr or r.stdout).strip()[-500:]}")
    yield {"SLURM_CONF": str(STATE / "slurm.conf")}
    if not was_up:
        _cluster("stop")


def _job_env(slurm: dict[str, str], setup: str = "torchrun", **extra: str) -> dict[str, str]:
    return child_env(
        **slurm,
        PYTHONPATH=str(REPO / "tests"),
        SCALETRAIN_PYTHON=sys.executable,
        SCALETRAIN_ROOT=str(REPO),
        SCALETRAIN_DS_CONFIG=SETUPS[setup][1],
        **extra,
    )


def _client(args: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env, cwd=REPO)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
    return r.stdout


def submit(setup: str, overrides: list[str], log: Path, env: dict[str, str]) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", f"--output={log}", SETUPS[setup][0], *overrides]
    return _client(cmd, env).strip().split(";")[0]


def job_info(job: str, env: dict[str, str]) -> dict[str, str]:
    out = _client(["scontrol", "show", "job", "--oneliner", job], env)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_job(job: str, env: dict[str, str], log: Path, timeout: float = 150) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job, env)
        if info["JobState"] in DONE:
            return info
        time.sleep(0.25)
    subprocess.run(["scancel", job], env=env, timeout=30)
    text = log.read_text()[-4000:] if log.exists() else "(no log)"
    raise AssertionError(f"job {job} not done after {timeout}s: {job_info(job, env)['JobState']}\n{text}")


def _overrides(tiny_data: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(
        tiny_data,
        run,
        **{"model.factory": "fault_models:slow_lm", "train.max_steps": 16, "checkpoint.every": 0, **extra},
    )


@pytest.fixture(scope="module")
def straight_runs(slurm, tiny_data: Path, tmp_path_factory) -> dict[str, Path]:
    """One unpreempted job per script (DeepSpeed ZeRO-2 for deepspeed.sbatch): the references."""
    out: dict[str, Path] = {}
    for setup in ("torchrun", "deepspeed"):
        run = tmp_path_factory.mktemp(f"straight-{setup}")
        log = run.parent / f"{run.name}.log"
        job = submit(setup, _overrides(tiny_data, run / "run"), log, _job_env(slurm, setup, SLOW_STEP_S="0"))
        info = wait_job(job, _job_env(slurm), log)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
        out[setup] = run / "run"
    return out


@pytest.mark.parametrize("setup", ["torchrun", "deepspeed"])
def test_sbatch_job_completes(straight_runs: dict[str, Path], setup: str):
    run = straight_runs[setup]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 17))
    assert (run / "ckpt" / "latest").read_text().strip() == "step_00000016"


@pytest.mark.parametrize(
    ("setup", "scancel_mode"),
    [("torchrun", "--batch"), ("srun", None), pytest.param("deepspeed", None, marks=pytest.mark.slow)],
)
def test_preemption_saves_requeues_and_resumes(
    slurm, straight_runs, tiny_data: Path, tmp_path: Path, setup: str, scancel_mode: str | None
):
    """SIGUSR1 mid-run: save, exit 75, `scontrol requeue`, resume from latest; every step logged once and
    the losses equal the unpreempted run's (fp32 resumes exactly). torchrun: the signal goes to the
    batch shell (`scancel --batch`), which forwards it; srun: straight to the job step's tasks."""
    env = _job_env(slurm, setup, SLOW_STEP_S="0.15")
    log, run = tmp_path / "job.log", tmp_path / "run"
    job = submit(setup, _overrides(tiny_data, run), log, env)
    deadline = time.monotonic() + 90
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3):
        assert time.monotonic() < deadline, f"no training steps within 90 s\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    _client(["scancel", *([scancel_mode] if scancel_mode else []), "--signal=USR1", job], env)
    info = wait_job(job, env, log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    assert "requeueing job" in text and "resumed from" in text
    got, want = losses(run), losses(straight_runs[REFERENCE[setup]])
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 17))
    assert got == want


def test_crash_on_one_rank_ends_srun_job(slurm, tiny_data: Path, tmp_path: Path):
    """srun --kill-on-bad-exit (SCALETRAIN_KILL_ON_BAD_EXIT=1): rank 1 raises at step 3; the job fails
    soon after (not after the 600 s collective timeout) and its log names rank 1."""
    mark, log = tmp_path / "fault", tmp_path / "job.log"
    env = _job_env(slurm, "srun", FAULT_RANK="1", FAULT_STEP="3", FAULT_MARK=str(mark), SCALETRAIN_KILL_ON_BAD_EXIT="1")
    o = tiny_overrides(
        tiny_data, tmp_path / "run", **{"model.factory": "fault_models:crash_lm", "train.max_steps": 8}
    )
    info = wait_job(submit("srun", o, log, env), env, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", text[-3000:]
    assert "rank 1 failed: RuntimeError: injected fault on rank 1" in text, text[-3000:]
    ended = time.mktime(time.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert ended - float(mark.read_text()) < 30  # EndTime has 1 s resolution
