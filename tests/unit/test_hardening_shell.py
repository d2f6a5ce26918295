"""Items 8 (shell part) and 20: static checks of the launch scripts and their helper functions."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*(ROOT / "launch" / "slurm").glob("*.sh"), *(ROOT / "launch" / "slurm").glob("*.sbatch"),
                  ROOT / "launch" / "setup_env.sh"])
COMMON = ROOT / "launch" / "slurm" / "_common.sh"


def _bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})


def _function(path: Path, name: str) -> str:
    text = path.read_text()
    m = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.M | re.S)
    assert m, f"{name} not found in {path.name}"
    return m.group(0)


def _arrays_declared(text: str) -> set[str]:
    names = set(re.findall(r"^\s*(?:local\s+)?([A-Za-z_]\w*)=\(", text, re.M))
    names |= set(re.findall(r"read -r -a (\w+)", text))
    names |= set(re.findall(r"mapfile -t (\w+)", text))
    return names


def static_problems(path: Path) -> list[str]:
    """What the review asked us to catch: unguarded empty-array expansions, ephemeral ports, /tmp paths."""
    # Comments may name the ranges they avoid; only code counts.
    text = "\n".join("" if ln.lstrip().startswith("#") else ln.split(" # ")[0] for ln in path.read_text().splitlines())
    problems = []
    known_nonempty = {"PACKAGES", "pip", "NODES"}  # literal non-empty lists / checked by `:?`
    for name in _arrays_declared(text) - known_nonempty:
        for m in re.finditer(rf'(?<!\+)"\$\{{{name}\[@\]\}}"', text):
            before = text[max(0, m.start() - len(name) - 8) : m.start()]
            if f"{name}[@]+" not in before:
                problems.append(f"{path.name}: unguarded \"${{{name}[@]}}\" (fails under set -u on bash <= 4.3)")
    for m in re.finditer(r"(?<![\w.])(\d{5})(?![\w.])", text):
        if 32768 <= int(m.group(1)) <= 65535:
            problems.append(f"{path.name}: port-like number {m.group(1)} in the ephemeral range")
    for m in re.finditer(r"(?<![\w$}])/tmp/[\w.-]+", text):
        problems.append(f"{path.name}: fixed path {m.group(0)} in the shared temporary folder")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_static_checks(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert static_problems(script) == []


def test_static_check_catches_known_bad_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text('A=()\ncmd "${A[@]}"\nPORT=$((40000 + 1))\nSTATE=/tmp/fixed-dir\n')
    assert len(static_problems(bad)) == 3


def test_master_port_below_ephemeral_range() -> None:
    fn = _function(COMMON, "master_port")
    out = _bash(fn + 'for j in 0 1 11999 12000 99999 123456789 4294967295; do master_port "$j"; done')
    ports = [int(x) for x in out.stdout.split()]
    assert len(ports) == 7 and all(1024 < p < 32768 for p in ports)
    assert ports[0] == ports[3]  # stable by job id modulo the range


@pytest.mark.parametrize(
    ("rc", "restarts", "max_", "enabled", "want"),
    [
        (75, 0, 20, 1, "requeue"),
        (75, 19, 20, 1, "requeue"),
        (75, 20, 20, 1, "stop"),  # cap reached
        (75, 0, 20, 0, "stop"),  # requeue switched off
        (74, 0, 20, 1, "stop"),  # stop-save failed: never requeue
        (0, 0, 20, 1, "stop"),
        (1, 0, 20, 1, "stop"),
        (137, 0, 20, 1, "stop"),
    ],
)
def test_requeue_decision_only_75_and_capped(rc: int, restarts: int, max_: int, enabled: int, want: str) -> None:
    fn = _function(COMMON, "requeue_decision")
    out = _bash(f"set -u; EXIT_PREEMPTED=75\n{fn}requeue_decision {rc} {restarts} {max_} {enabled}")
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr


def test_find_root_fails_with_one_clear_line(tmp_path: Path) -> None:
    fn = _function(COMMON, "find_root")
    out = _bash(f"set -u\n{fn}cd {tmp_path} && find_root", SLURM_SUBMIT_DIR=str(tmp_path))
    # BASH_SOURCE is empty under `bash -c`: only the two variables are candidates, both wrong.
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "SCALETRAIN_ROOT" in out.stderr
    out = _bash(f"set -u\n{fn}find_root", SLURM_SUBMIT_DIR=str(ROOT))
    assert out.returncode == 0 and out.stdout.strip() == str(ROOT)


def test_local_cluster_state_dir_refuses_symlink_and_foreign_owner(tmp_path: Path) -> None:
    fn = _function(ROOT / "launch" / "slurm" / "local_cluster.sh", "check_state_dir")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _bash(f"{fn}check_state_dir {link}").returncode == 1
    assert _bash(f"{fn}check_state_dir {target} 4242").returncode == 1  # owned by someone else
    assert _bash(f"{fn}check_state_dir relative/dir").returncode == 1
    fresh = tmp_path / "fresh" / "state"
    assert _bash(f"{fn}check_state_dir {fresh}").returncode == 0 and fresh.is_dir()


def test_sbatch_empty_arrays_run_under_set_u() -> None:
    # The guarded form expands to nothing for an empty array on every bash version.
    out = _bash('set -u; A=(); f() { echo "$#"; }; f ${A[@]+"${A[@]}"} x')
    assert out.stdout.strip() == "1"
