"""Item 19: canonical_name strips wrapper prefixes only, never a user's submodule named `module`."""

from __future__ import annotations

import torch

from scaletrain.model.weights import canonical_name


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2)  # a user submodule literally named `module`
        self.proj = torch.nn.Linear(2, 2)


class _User(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = _Inner()
        self.module = torch.nn.Linear(2, 2)


def test_canonical_name_keeps_user_submodule_named_module() -> None:
    model = _User()
    raw = [n for n, _ in model.named_parameters()]

    class _DDPLike(torch.nn.Module):  # DDP registers the model as `module`
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.module = m

    wrapped = [n for n, _ in _DDPLike(model).named_parameters()]
    assert [canonical_name(n) for n in wrapped] == raw
    assert len({canonical_name(n) for n in wrapped}) == len(wrapped)  # no collisions
    assert canonical_name("module._orig_mod.enc.module.weight") == "enc.module.weight"
    assert canonical_name("_orig_mod.module.module.weight") == "module.weight"
    assert canonical_name("module._orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight") == (
        "blocks.0.attn.qkv.weight"
    )
    assert canonical_name("_fsdp_wrapped_module.h.0._fsdp_wrapped_module.w") == "h.0.w"


def test_item17_index_shard_names_stay_beside_the_index(tmp_path):
    """A safetensors index whose shard names leave the folder, or name an index (itself), is refused
    in one line by both readers (init_from's streaming one and the plain loader)."""
    import json

    import pytest

    from scaletrain.errors import CheckpointError
    from scaletrain.model.materialize import WeightsSource
    from scaletrain.model.weights import load_weights_file

    for shard in ("../outside.safetensors", "/etc/x.safetensors", "model.safetensors.index.json"):
        index = tmp_path / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError, match="not a plain weights file beside"):
            load_weights_file(index)
        with pytest.raises(CheckpointError, match="not a plain weights file beside"):
            WeightsSource(index)
