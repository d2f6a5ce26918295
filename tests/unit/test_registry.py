"""Backend specs: one spelling per backend, used by every command that names backends."""

from __future__ import annotations

import pytest

from scaletrain.config import load_config
from scaletrain.engines import registry
from scaletrain.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("ddp", {"backend.kind": "ddp"}),
        ("fsdp", {"backend.kind": "fsdp", "backend.fsdp.sharding": "full_shard"}),
        ("fsdp:hybrid_shard", {"backend.kind": "fsdp", "backend.fsdp.sharding": "hybrid_shard"}),
        ("fsdp+offload", {"backend.kind": "fsdp", "backend.fsdp.sharding": "full_shard", "backend.fsdp.cpu_offload": True}),
        ("tp:2", {"backend.kind": "fsdp", "backend.tp_size": 2}),
        ("deepspeed", {"backend.kind": "deepspeed", "backend.deepspeed.stage": 2}),
        ("DeepSpeed:3+offload", {"backend.kind": "deepspeed", "backend.deepspeed.stage": 3,
                                 "backend.deepspeed.offload_optimizer": True, "backend.deepspeed.offload_param": True}),
    ],
)
def test_spec_overrides(spec: str, want: dict):
    assert registry.spec_overrides(spec) == want


@pytest.mark.parametrize("spec", ["ddp", "fsdp:full_shard", "fsdp:no_shard", "tp:2", "deepspeed:1", "deepspeed:3+offload"])
def test_spec_of_round_trips(spec: str):
    cfg = load_config(None, [f"{k}={v}" for k, v in registry.spec_overrides(spec).items()])
    assert registry.spec_of(cfg) == spec


@pytest.mark.parametrize("bad", ["dp", "fsdp:zero3", "tp", "tp:x", "deepspeed:4", "ddp+offload", "ddp:2"])
def test_bad_specs_name_the_valid_ones(bad: str):
    with pytest.raises(ConfigError, match=r"backend spec .*valid specs: ddp, fsdp\["):
        registry.spec_overrides(bad)


def test_every_backend_kind_is_registered():
    from typing import get_args

    from scaletrain.config import BackendKind

    assert set(registry.BACKENDS) == set(get_args(BackendKind))
