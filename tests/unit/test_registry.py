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
    """The config's table of backends is the registry's: `backend.kind` takes exactly the registered
    kinds, and each backend's own section is `backend.<kind>`."""
    from typing import get_args

    from scaletrain.config import BackendConfig, valid_keys
    from scaletrain.config.schema import backend_kinds

    assert list(registry.BACKENDS) == list(backend_kinds()) == ["ddp", "fsdp", "deepspeed"]
    assert set(get_args(BackendConfig.model_fields["kind"].annotation)) == set(registry.BACKENDS)
    for kind, b in registry.BACKENDS.items():
        assert b.kind == kind
        if b.config_section is not None:
            assert isinstance(getattr(load_config().backend, kind), b.config_section)
            assert f"backend.{kind}" in valid_keys()


def test_every_default_spec_parses_and_round_trips():
    for spec in registry.default_specs():
        cfg = load_config(None, [f"{k}={v}" for k, v in registry.spec_overrides(spec).items()])
        assert registry.spec_of(cfg) == spec


def test_a_registered_backend_joins_the_config_and_the_grammar():
    from pydantic import Field

    from scaletrain.config.schema import Int, Section
    from scaletrain.engines.backends.ddp import DDPBackend

    class EchoConfig(Section):
        width: Int = Field(3, ge=1)

    class Echo(DDPBackend):
        kind, config_section, spec_words, spec_help = "echo", EchoConfig, ("echo",), "echo"

    with pytest.raises(ConfigError, match="must be one of 'ddp', 'fsdp' or 'deepspeed'"):
        load_config(None, ["backend=echo"])
    registry.register(Echo())
    try:
        cfg = load_config(None, ["backend=echo", "backend.echo.width=5"])
        assert cfg.backend.echo.width == 5 and registry.spec_of(cfg) == "echo"
        assert registry.spec_overrides("echo") == {"backend.kind": "echo"}
        assert "echo" in registry.SPEC_HELP
        with pytest.raises(ConfigError, match=r"unknown key 'backend.echo.widht'; did you mean 'backend.echo.width'"):
            load_config(None, ["backend=echo", "backend.echo.widht=5"])
        with pytest.raises(ValueError, match="taken by"):  # a second object under the same name
            registry.register(Echo())
    finally:
        registry.unregister("echo")
    assert "echo" not in registry.BACKENDS and not hasattr(load_config().backend, "echo")
    with pytest.raises(ConfigError, match="unknown backend"):
        registry.spec_overrides("echo")


def test_a_spec_names_the_whole_backend():
    """spec_tree: what a spec does not set starts from what no spec means (tp:2 is FSDP full_shard)."""
    cfg = load_config(None, ["backend=fsdp", "backend.fsdp.sharding=hybrid_shard", "backend.fsdp.cpu_offload=true",
                             "backend.fsdp.activation_checkpointing=true"])
    tree = registry.spec_tree(cfg.to_json_dict(), "tp:2")
    fsdp = tree["backend"]["fsdp"]
    assert tree["backend"]["tp_size"] == 2 and fsdp["sharding"] == "full_shard" and fsdp["cpu_offload"] is False
    assert fsdp["activation_checkpointing"] is True  # not a spec's to say
    ds = registry.spec_tree(load_config(None, ["backend=deepspeed", "backend.deepspeed.stage=3"]).to_json_dict(), "ddp")
    assert ds["backend"]["kind"] == "ddp" and ds["backend"]["deepspeed"]["stage"] is None


def test_a_backend_says_whether_its_files_fix_the_world_size():
    assert registry.fixed_world("deepspeed:3") and not registry.fixed_world("fsdp") and not registry.fixed_world("ddp")
    with pytest.raises(ConfigError, match="unknown backend"):
        registry.fixed_world("horovod")


def test_config_objects_pickle_with_their_backend_sections():
    import pickle

    cfg = load_config(None, ["backend=fsdp", "backend.fsdp.sharding=no_shard"])
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.backend.fsdp.sharding == "no_shard"
