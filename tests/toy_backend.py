"""A backend registered from outside the package: DDP under its own spec name (`toyddp`), with its
own config section (`backend.toyddp.bucket_cap_mb`) and its own check (at least 2 processes).

Imported, `register()` adds it to the registry (and so to the config schema). Run as a script it is
a launcher: it registers the backend in each process, then runs `scaletrain train` with its arguments
(`torchrun --nproc_per_node=2 tests/toy_backend.py backend=toyddp ...`)."""

from __future__ import annotations

import sys

from pydantic import Field

from scaletrain.config import Config
from scaletrain.config.schema import Int, Section
from scaletrain.engines import registry
from scaletrain.engines.backends.ddp import DDPBackend, DDPConfig
from scaletrain.errors import ConfigError


class ToyDDPConfig(Section):
    bucket_cap_mb: Int = Field(1, ge=1, description="DDP's gradient bucket size, in MB.")


class ToyDDP(DDPBackend):
    kind = "toyddp"
    config_section = ToyDDPConfig
    spec_words = ("toyddp",)
    spec_help = "toyddp"
    default_specs = ("toyddp",)

    def validate(self, cfg: Config, world_size: int) -> None:
        super().validate(cfg, world_size)
        if world_size < 2:
            raise ConfigError(f"backend=toyddp: needs at least 2 processes (got {world_size}); "
                              "launch with torchrun --nproc_per_node=2")

    def ddp_settings(self, cfg: Config) -> DDPConfig:
        return DDPConfig(bucket_cap_mb=cfg.backend.toyddp.bucket_cap_mb)

    def build(self, spec, cfg: Config):
        engine = super().build(spec, cfg)
        # The name the loop logs at start-up: proof that this builder ran, with this section's value
        # in the DDP wrapper itself.
        engine.name = f"toyddp-bucket-{engine._forward_module().bucket_bytes_cap >> 20}mb"
        return engine


def register() -> ToyDDP:
    return registry.register(ToyDDP())  # type: ignore[return-value]


if __name__ == "__main__":
    register()
    from scaletrain.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
