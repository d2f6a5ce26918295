"""`scaletrain parity` end to end: real 2-process runs of the tiny GPT, 3 steps per backend.

One comparison across every backend (shared by a module fixture), one where a backend gets another
learning rate, and bad input that must cost no training at all. Every command runs through
`helpers.run_cmd` (own session, killed as a group on timeout); parity kills its own runs likewise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import run_cmd, tiny_overrides

STEPS = 3
ALL = ("ddp", "fsdp", "tp:2", "deepspeed:1", "deepspeed:2", "deepspeed:3")
# DeepSpeed runs may JIT-build a CPU op on a fresh machine (see test_deepspeed.py); room for that.
pytestmark = pytest.mark.timeout(1500)


def base_overrides(data: Path) -> list[str]:
    # tiny_overrides names run.out_dir, train.max_steps, checkpoint.every, which parity sets itself.
    owned = ("run.out_dir=", "train.max_steps=", "train.log_every=", "checkpoint.every=")
    return [o for o in tiny_overrides(data, Path("unused"), **{"train.eval_steps": 0}) if not o.startswith(owned)]


def parity(data: Path, *args: str, timeout: float = 1200):
    return run_cmd([sys.executable, "-m", "scaletrain", "parity", "--steps", str(STEPS), "--nproc", "2",
                    "--timeout", "600", *args, *base_overrides(data)], timeout=timeout)


@pytest.fixture(scope="module")
def all_backends(tiny_data: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "all"
    return parity(tiny_data, "--backends", ",".join(ALL), "--out", str(out)), out


def test_every_backend_agrees_with_ddp(all_backends):
    result, out = all_backends
    print(result.stdout)  # the table, for -rA / -s
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    header = result.stdout.splitlines()[0]
    for spec in ALL:
        assert spec in header, spec
    rows = [ln.split() for ln in result.stdout.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
    assert all(r[-1] == "ok" for r in rows), result.stdout
    assert "parity ok" in result.stdout
    # --out is kept: one run folder per backend, each with a metric record per step
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        f"{i}-{s.replace(':', '_')}" for i, s in enumerate(ALL, 1))


def test_a_different_learning_rate_diverges(tiny_data: Path):
    result = parity(tiny_data, "--backends", "ddp,fsdp", "--override", "fsdp:optim.lr=2e-3")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DIVERGES: fsdp lr" in result.stdout  # step 1: same loss and gradients, another learning rate
    assert "DIVERGES: fsdp loss" in result.stdout  # step 2 on: the update differed
    assert "parity FAILED: fsdp diverges from ddp from step 1" in result.stdout


@pytest.mark.parametrize(("args", "names"), [
    (["--backends", "ddp,fsdp:bogus"], "--backends"),
    (["--backends", "ddp"], "--backends"),
    (["--backends", "ddp,fsdp", "--override", "tp:2:optim.lr=1e-3"], "--override"),
    (["--backends", "ddp,fsdp", "--override", "fsdp:optim.lr"], "--override"),
    (["--backends", "ddp,fsdp", "--override", "ddp:optim.lr=fast"], "optim.lr"),
    (["--backends", "ddp,tp:3"], "tp_size"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_data: Path, tmp_path: Path, capsys, args: list[str], names: str):
    from scaletrain.cli import main  # in this process: nothing is launched, so nothing to kill

    assert main(["parity", *args, "--out", str(tmp_path / "p"), *base_overrides(tiny_data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], lines
    assert not (tmp_path / "p").exists()  # nothing was launched


def _plan(data: Path, out: Path, overrides: list[str], override: list[str] = ()):
    """parity's planning alone, in this process: every check, no training."""
    import argparse

    from scaletrain.experiments.parity import plan_runs

    args = argparse.Namespace(backends="ddp,fsdp", overrides=[*base_overrides(data), *overrides],
                              override=list(override), steps=STEPS, nproc=2, config=None)
    return plan_runs(args, out)


def test_the_overrides_of_a_training_command_are_taken_and_what_parity_replaced_is_one_line(
        tiny_data: Path, tmp_path: Path, capsys):
    from scaletrain.config import load_config

    out = tmp_path / "p"
    runs = _plan(tiny_data, out, ["train.log_every=10", "precision=bf16", "optim.lr=2e-3"],
                 ["fsdp:checkpoint.every=5", "fsdp:optim.weight_decay=0.2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["parity: replaced train.log_every=10 -> 1, precision=bf16 -> fp32, fsdp:checkpoint.every=5 -> 0 "
                     "(parity sets them)"], lines
    for run in runs:
        cfg = load_config(None, run.overrides)
        assert (cfg.train.log_every, cfg.precision, cfg.checkpoint.every) == (1, "fp32", 0), run.spec
        assert cfg.optim.lr == 2e-3 and cfg.run.out_dir == run.run_dir  # the rest of the user's overrides stand
        assert cfg.optim.weight_decay == (0.2 if run.spec == "fsdp" else load_config(None, []).optim.weight_decay)
        assert not {"train.log_every=10", "precision=bf16", "fsdp:checkpoint.every=5"} & set(run.overrides)
    assert not out.exists()  # planning writes nothing


def test_replacing_steps_or_the_run_folder_names_the_flag_that_sets_them(tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "p"
    _plan(tiny_data, out, ["train.max_steps=500", f"run.out_dir={tmp_path / 'mine'}", "checkpoint.resume=auto"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"parity: replaced train.max_steps=500 -> {STEPS}, run.out_dir={tmp_path / 'mine'} -> "
                     f"{out}/<n>-<spec>, checkpoint.resume=auto -> never (parity sets them; --out and --steps "
                     "choose them)"], lines
    capsys.readouterr()
    _plan(tiny_data, tmp_path / "q", ["optim.lr=2e-3"])  # nothing of parity's: nothing said
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# The comparison and the report on made-up records (no processes)


def _run(spec: str, losses: list[float], tmp: Path, *, tp: bool = False, error: str | None = None):
    from scaletrain.experiments.parity import BackendRun

    records = {i: {"step": i, "loss": v, "grad_norm": 1.0, "lr": 1e-3} for i, v in enumerate(losses, 1)}
    return BackendRun(spec, [], tmp / spec, tp=tp, records=records, error=error,
                      tail=["error: 1 non-finite steps in a row"] if error else [])


def _report(runs, steps: int, tolerance=None) -> int:
    import argparse

    from scaletrain.experiments.parity import compare, report

    args = argparse.Namespace(steps=steps, tolerance=tolerance)
    return report(runs, compare(runs, steps, tolerance), args, kept=True)


def test_tp_specs_get_the_looser_default_tolerance(tmp_path: Path, capsys):
    ref = _run("ddp", [5.0, 4.0], tmp_path)
    assert _report([ref, _run("tp:2", [5.0, 4.0 * (1 + 5e-4)], tmp_path, tp=True)], 2) == 0
    assert _report([ref, _run("fsdp", [5.0, 4.0 * (1 + 5e-4)], tmp_path)], 2) == 1
    assert "DIVERGES: fsdp loss" in capsys.readouterr().out
    assert _report([ref, _run("tp:2", [5.0, 4.0 * (1 + 5e-4)], tmp_path, tp=True)], 2, tolerance=1e-4) == 1


def test_a_backend_that_fails_shows_its_last_lines_and_exits_1(tmp_path: Path, capsys):
    runs = [_run("ddp", [5.0, 4.0, 3.0], tmp_path), _run("fsdp", [5.0], tmp_path, error="exit code 1")]
    assert _report(runs, 3) == 1
    out = capsys.readouterr().out
    assert "no record: fsdp" in out and "fsdp failed: exit code 1" in out
    assert "error: 1 non-finite steps in a row" in out
    assert "parity FAILED: fsdp did not run to the end" in out


def test_the_tail_skips_the_launchers_report(tmp_path: Path):
    from scaletrain.experiments.parity import _tail

    err = tmp_path / "x.err"
    err.write_text("error: bad thing\nerror: bad thing\n"
                   "E1129 torch/distributed/elastic/multiprocessing/api.py failed\nTraceback ...\n")
    assert _tail(err) == ["error: bad thing"]
