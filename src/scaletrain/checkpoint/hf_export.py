"""The `config.json` of a Hugging Face style export (`scaletrain consolidate --format hf`).

The model is rebuilt from the tag's meta.json (`config.model` and `model.vocab_size`) on the meta
device, so no weight is ever allocated, and the checkpoint's tensors are compared with its
parameters (names and shapes) before anything is written: a tag of another model size, or a factory
that has changed since, is refused in one line.

- A model from `model.factory` that is a Hugging Face `PreTrainedModel` (it has a `config` with
  `to_json_string`) gets its own config, with `architectures` and `dtype` set as `save_pretrained`
  sets them, so `AutoModelForCausalLM.from_pretrained(folder)` loads the export.
- The built-in GPT has no Hugging Face class. Its config.json holds scaletrain's model config under
  `"model_type": "scaletrain-gpt"` (see `builtin_config` and docs/checkpoints.md, "Export"); the folder
  is what `model.init_from` reads back.

Imports: torch, `scaletrain.config`, `scaletrain.model.materialize`, `scaletrain.model.build`,
`scaletrain.checkpoint.readers`, `scaletrain.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from scaletrain.checkpoint.readers import Reader
from scaletrain.config import ModelConfig
from scaletrain.errors import CheckpointError, ScaletrainError
from scaletrain.model.build import build_model
from scaletrain.model.materialize import build_on_meta, tie_groups

GPT_MODEL_TYPE = "scaletrain-gpt"
# The ModelConfig fields that shape the built-in GPT (the rest say how to train or where from).
GPT_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")

_PREFIX = "consolidate --format hf"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_section(tag_dir: Path, meta: dict[str, Any] | None) -> tuple[ModelConfig, int]:
    """The run's model config and vocabulary size, as the tag's meta.json recorded them."""
    try:
        section = dict(meta["config"]["model"])  # type: ignore[index]
        vocab = int(meta["model"]["vocab_size"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{_PREFIX}: {tag_dir}/meta.json does not record the model config; export this tag "
                              "with --format safetensors") from None
    try:
        return ModelConfig(**section), vocab
    except Exception as e:  # pydantic's report spans lines; one is enough here
        raise CheckpointError(f"{_PREFIX}: {tag_dir}/meta.json: the model config is not valid here "
                              f"({_first_line(e)}); export this tag with --format safetensors") from None


def build_meta_model(cfg: ModelConfig, vocab: int) -> nn.Module:
    """The model on the meta device (buffers real, parameters shape-only), errors as one line."""
    try:
        return build_on_meta(lambda: build_model(cfg, vocab))
    except ScaletrainError as e:
        raise CheckpointError(f"{_PREFIX}: {_first_line(e)}") from None
    except Exception as e:  # the user's factory raised: say which one, in one line
        raise CheckpointError(f"{_PREFIX}: model.factory {cfg.factory} failed to build the model "
                              f"({type(e).__name__}: {_first_line(e)}); fix the factory or export with "
                              "--format safetensors") from None


def check_match(model: nn.Module, reader: Reader, tag_dir: Path) -> None:
    """Every parameter of `model` is in the checkpoint (under one of its tied names) with its shape."""
    missing, wrong = [], []
    for names, param in tie_groups(model):
        stored = next((n for n in names if n in reader.entries), None)
        if stored is None:
            missing.append(names[0])
        elif tuple(reader.entries[stored][0]) != tuple(param.shape):
            wrong.append(f"{stored} {tuple(reader.entries[stored][0])} vs {tuple(param.shape)}")
    if missing or wrong:
        what = "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                           f"shapes differ: {wrong[:3]}" if wrong else "") if part)
        raise CheckpointError(f"{_PREFIX}: {tag_dir} does not hold the model its meta.json describes ({what}); "
                              "was model.factory changed since the run? export with --format safetensors")


def builtin_config(cfg: ModelConfig, vocab: int, dtype: torch.dtype) -> dict[str, Any]:
    """The documented config.json of the built-in GPT."""
    return {"model_type": GPT_MODEL_TYPE, **{f: getattr(cfg, f) for f in GPT_FIELDS}, "vocab_size": vocab,
            "dtype": str(dtype).removeprefix("torch.")}


def config_json(tag_dir: Path, meta: dict[str, Any] | None, reader: Reader, dtype: torch.dtype) -> str:
    """The text of config.json for the tag; raises CheckpointError before anything is written."""
    cfg, vocab = model_section(tag_dir, meta)
    model = build_meta_model(cfg, vocab)
    check_match(model, reader, tag_dir)
    if cfg.factory is None:
        return json.dumps(builtin_config(cfg, vocab, dtype), indent=2, sort_keys=True) + "\n"
    hf_config = getattr(model, "config", None)
    if not callable(getattr(hf_config, "to_json_string", None)):
        raise CheckpointError(f"{_PREFIX}: model.factory {cfg.factory} builds a {type(model).__name__}, which has "
                              "no Hugging Face config; export with --format safetensors")
    hf_config.architectures = [type(model).__name__]
    hf_config.dtype = dtype
    return str(hf_config.to_json_string(use_diff=False))
