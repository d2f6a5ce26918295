"""What a person sees in a terminal: log lines print above the progress bar, which stays on the last line
(a real terminal: a detached tmux session, 110x30), and an error every rank reaches is one line per job,
not one per rank (2 processes under torchrun)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_overrides, train

BAR = re.compile(r"[━╸╺]|\b\d+/40\b")  # a fragment of the progress bar: its track or its M/N count
LOG = re.compile(r"\b(INFO|WARNING|ERROR)\b|^step \d+ \||\bstep \d+ \| loss")  # a log line or a metric line
STEPS, EVERY_LOG, EVERY_SAVE = 40, 5, 10


def _tmux(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", *args], capture_output=True, text=True,
                          timeout=30)


def _screen_of_a_run(tmp_path: Path, overrides: list[str], timeout: float = 60) -> tuple[int, list[str]]:
    """Run `python -m scaletrain train` in a detached 110x30 tmux session; its exit code and the whole
    pane (scrollback included) once it is done."""
    script = tmp_path / "run.sh"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1"}
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "scaletrain", "train", *overrides])
    script.write_text(
        "unset COLUMNS LINES TTY_INTERACTIVE TTY_COMPATIBLE FORCE_TERMINAL NO_COLOR\n"  # the terminal decides
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        + f"cd {shlex.quote(str(tmp_path))}\n{cmd}\necho $? > rc\nsleep 600\n")
    sock = f"scaletrain-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        started = _tmux(sock, "new-session", "-d", "-s", "t", "-x", "110", "-y", "30", f"bash {script}")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + timeout
        while not (tmp_path / "rc").is_file() or not (tmp_path / "rc").read_text().strip():
            assert time.monotonic() < deadline, _tmux(sock, "capture-pane", "-p", "-S", "-", "-t", "t").stdout
            time.sleep(0.2)
        time.sleep(0.3)  # the last lines reach the pane
        pane = _tmux(sock, "capture-pane", "-p", "-S", "-", "-t", "t").stdout
        return int((tmp_path / "rc").read_text()), pane.rstrip("\n").splitlines()
    finally:
        _tmux(sock, "kill-server")  # the server this test started, and the shell in its pane
        tmux_dir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (tmux_dir / sock).unlink(missing_ok=True)  # kill-server may leave its socket file behind


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.timeout(120)
def test_log_lines_print_above_the_progress_bar_in_a_terminal(tiny_data: Path, tmp_path: Path):
    overrides = tiny_overrides(tiny_data, Path("r"), **{
        "train.max_steps": STEPS, "train.log_every": EVERY_LOG, "checkpoint.every": EVERY_SAVE,
        "logging.console": True, "train.eval_steps": 0})
    rc, lines = _screen_of_a_run(tmp_path, overrides)
    screen = "\n".join(lines)
    assert rc == 0, screen
    mixed = [ln for ln in lines if BAR.search(ln) and LOG.search(ln)]
    assert not mixed, f"log lines on the bar's line:\n{screen}"
    bars = [ln for ln in lines if BAR.search(ln)]
    assert len(bars) == 1 and f"{STEPS}/{STEPS}" in bars[0], f"the bar was drawn {len(bars)} times:\n{screen}"
    for step in range(EVERY_LOG, STEPS + 1, EVERY_LOG):  # metric lines: whole, each on a line of its own
        assert len([ln for ln in lines if re.match(rf"step {step} \| loss \d", ln)]) == 1, (step, screen)
    for step in range(EVERY_SAVE, STEPS + 1, EVERY_SAVE):  # log lines: whole, each on a line of its own
        want = rf"^(\[[\d:]+\])?\s+INFO\s+saved checkpoint r/ckpt/step_{step:08d}$"
        assert len([ln for ln in lines if re.match(want, ln.rstrip())]) == 1, (step, screen)
    assert re.match(r"^(\[[\d:]+\])?\s+INFO\s+run finished: r at step 40 ", lines[lines.index(bars[0]) + 1]), screen


@pytest.mark.timeout(300)
def test_an_error_every_rank_reaches_is_one_line_for_the_job(tiny_data: Path, tmp_path: Path):
    """Resuming a checkpoint of another model size on 2 ranks: every rank fails the same way, the job
    prints one `error:` line (rank 0's) and no traceback of ours; torchrun adds its own failure report
    (and its own traceback), which names exit code 2 for the ranks."""
    run = tmp_path / "r"
    train(tiny_overrides(tiny_data, run, **{"backend": "fsdp", "train.max_steps": 2, "checkpoint.every": 2}))
    r = train(tiny_overrides(tiny_data, run, **{"backend": "fsdp", "train.max_steps": 4, "model.n_embd": 64}),
              check=False, timeout=240)
    assert r.returncode != 0, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "written for another model" in errors[0], r.stderr[-5000:]
    assert "error:" not in r.stdout and "Traceback" not in r.stdout, r.stdout[-3000:]
    lines = r.stderr.splitlines()
    ours = [i for i, ln in enumerate(lines) if ln.startswith("Traceback") and "torchrun" not in
            "".join(lines[i + 1:i + 2])]
    assert not ours, r.stderr[-5000:]  # the only traceback is torchrun's own, of its ChildFailedError
    assert re.search(r"exitcode\s*:\s*2\b", r.stderr), r.stderr[-3000:]
    said = errors[0].removeprefix("error: ")
    assert sum(said in ln for ln in lines) == 1, r.stderr[-5000:]  # no rank's log line repeats it
