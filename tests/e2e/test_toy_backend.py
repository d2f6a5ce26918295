"""A backend registered from a test file (`tests/toy_backend.py`: DDP under the spec `toyddp`, with its
own section `backend.toyddp.bucket_cap_mb`) is a backend like the built-ins: the config validates its
section, the registry parses and names its spec, `scaletrain plan` gives its row, and 2 gloo processes
train with it and resume bitwise (fp32 losses equal to an uninterrupted run's). Nothing in the package
names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import BIN, REPO, losses, run_cmd, tiny_overrides

from scaletrain.config import load_config
from scaletrain.engines import registry
from scaletrain.errors import ConfigError

LAUNCHER = REPO / "tests" / "toy_backend.py"


@pytest.fixture
def toy():
    import toy_backend

    backend = toy_backend.register()
    yield backend
    registry.unregister(backend.kind)


def _torchrun(overrides: list[str]) -> str:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(LAUNCHER), *overrides]
    result = run_cmd(cmd, timeout=120, check=True)
    return result.stdout + result.stderr


def test_the_config_and_the_grammar_know_a_registered_backend(toy):
    cfg = load_config(None, ["backend=toyddp", "backend.toyddp.bucket_cap_mb=2"])
    assert cfg.backend.toyddp.bucket_cap_mb == 2 and registry.spec_of(cfg) == "toyddp"
    assert registry.spec_overrides("TOYDDP") == {"backend.kind": "toyddp"} and "toyddp" in registry.SPEC_HELP
    with pytest.raises(ConfigError, match=r"'backend.toyddp.bucket_cap_mb': Input should be greater than or equal to 1"):
        load_config(None, ["backend=toyddp", "backend.toyddp.bucket_cap_mb=0"])
    with pytest.raises(ConfigError, match="backend=toyddp: needs at least 2 processes"):
        registry.validate(cfg, 1)
    with pytest.raises(ConfigError, match=r"valid specs: ddp, .*toyddp"):
        registry.spec_overrides("toyddp:3")


def test_plan_gives_its_row(toy):
    from scaletrain.engines.plan import plan_every_backend, plan_memory

    tiny = ["model.n_layer=1", "model.n_head=1", "model.n_embd=4", "model.block_size=4", "model.vocab_size=8"]
    cfg = load_config(None, tiny)
    toy_row, ddp_row = plan_memory(cfg, 2, "toyddp"), plan_memory(cfg, 2, "ddp")
    assert toy_row.spec == "toyddp"
    assert (toy_row.params, toy_row.grads, toy_row.optimizer, toy_row.buffers) == (
        ddp_row.params, ddp_row.grads, ddp_row.optimizer, ddp_row.buffers)  # a DDP layout
    rows, _ = plan_every_backend(cfg, 2)
    assert [r.spec for r in rows][-1] == "toyddp"
    left_out = plan_every_backend(load_config(None, tiny), 1)[1]
    assert any(n.startswith("toyddp left out: backend=toyddp: needs at least 2") for n in left_out)


def test_two_processes_train_and_resume_bitwise(toy, tiny_data: Path, tmp_path: Path):
    """6 steps straight (a tag at step 3), then a new run resumed from that tag (fp32): steps 4-6 log the
    same losses. Each process registers the toy backend itself (the launcher)."""
    extra = {"backend": "toyddp", "backend.toyddp.bucket_cap_mb": 2, "train.max_steps": 6}
    out = _torchrun(tiny_overrides(tiny_data, tmp_path / "a", **extra, **{"checkpoint.every": 3}))
    assert "toyddp-bucket-2mb" in out  # its builder ran, and its section reached the DDP wrapper
    tag = tmp_path / "a" / "ckpt" / "step_00000003"
    meta = json.loads((tag / "meta.json").read_text())
    assert (meta["backend"], meta["backend_spec"], meta["format"], meta["world_size"]) == ("toyddp", "toyddp",
                                                                                           "sharded", 2)
    assert meta["config"]["backend"]["toyddp"] == {"bucket_cap_mb": 2}
    _torchrun(tiny_overrides(tiny_data, tmp_path / "b", **extra, **{"checkpoint.resume": tag}))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 7)) and sorted(b) == [4, 5, 6]  # the resumed run starts after step 3
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]


def test_nothing_in_the_package_names_it():
    src = REPO / "src" / "scaletrain"
    assert not [p for p in src.rglob("*.py") if "toyddp" in p.read_text()]
    assert "toyddp" not in registry.BACKENDS and not hasattr(load_config().backend, "toyddp")  # cleaned up
