"""Plain weight files: reading a consolidated file (safetensors, or a .pt state dict read with
`weights_only=True`) for `model.init_from`, and canonical parameter names.

Imports: torch, safetensors, `scaletrain.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaletrain.errors import CheckpointError

# Wrapper prefixes that must never reach a weights file: DDP, torch.compile, FSDP1, activation checkpointing.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


# Wrappers that sit at the front only (DDP once, torch.compile once, in either order) versus wrapper
# components that can appear mid-name and are reserved by torch (a user cannot mean them).
_FRONT_WRAPPERS = ("module", "_orig_mod")
_INNER_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """`module._orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight` -> `blocks.0.attn.qkv.weight`.

    Only wrapper prefixes are stripped: a user submodule literally named `module` (`enc.module.w`, or
    `module.module.w` under DDP) keeps its name, so two parameters never collapse into one."""
    parts = name.split(".")
    seen: set[str] = set()
    while len(parts) > 1 and parts[0] in _FRONT_WRAPPERS and parts[0] not in seen:
        seen.add(parts[0])
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _INNER_WRAPPERS)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A consolidated weights file (or a sharded one's index) as a dict of fp32 CPU tensors."""
    path = Path(path)
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                # Shards are plain files beside the index: no other folder, and never an index again.
                name = Path(str(shard)).name
                if name != str(shard) or name.endswith(".index.json"):
                    raise ValueError(f"shard name {shard!r} is not a plain weights file beside the index")
                out.update(load_weights_file(path.parent / name))
            return out
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # untrusted file: pickle refusals, safetensors header errors... all one line
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"weights file {path} cannot be read: {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights file {path} is not a flat dict of tensors")
    return {canonical_name(k): v.float() if v.is_floating_point() else v for k, v in sd.items()}


def complete_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the aliases of tied parameters (lm_head.weight for wte.weight, say) that a weights file
    stored once, so `load_state_dict(strict=True)` accepts it."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(canonical_name(name))
    out = dict(state)
    for names in groups.values():
        present = [n for n in names if n in out]
        for n in names:
            if present and n not in out:
                out[n] = out[present[0]]
    return out
