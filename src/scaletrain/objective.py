"""What a micro-batch is, how a model is called with it, and what its loss counts.

Batches. Token folders give a `TokenBatch(input_ids, targets)`. `data.factory` datasets give what
their collate returns: a mapping is passed to the model as keyword arguments, a tuple or list has
its first item passed positionally, a tensor is passed as it is.

Outputs. A model may return a tensor (the logits), a tuple whose first item is the logits, or a
mapping or object (a HuggingFace `ModelOutput`) with `logits` and/or `loss`.

Loss. Every micro-batch loss is a pair (sum, count): the summed loss of its counted items (tokens
whose label is not the ignore index, or examples) and how many there are. The loop divides the sum
over the whole global batch (all micro-steps, all ranks) by the count over the whole global batch,
so the gradient is that of one big batch however padding or ignored labels fall. In order:
  1. `model.loss_fn(outputs, batch)` returns a scalar mean (weighted by the batch's example count)
     or a `(sum, count)` pair;
  2. an output `loss` (a mean, as HuggingFace models compute it from `labels`) is weighted by the
     number of counted labels: shifted by one for causal language models, whose loss predicts the
     next token; by the example count when the batch has no labels;
  3. token data: fp32 cross entropy of the logits against the targets, every token counted;
  4. otherwise a one-line error naming `model.loss_fn`.
`eval.metrics_fn(outputs, batch)` returns `{name: (sum, count)}`, summed the same way.

Knows nothing of engines or ranks. Imports: torch, `scaletrain.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.errors import ConfigError


class HookError(ConfigError):
    """A user hook returned the wrong kind of value. Every rank runs the same check on the same kind
    of value, so every rank raises the same error: the CLI prints it once."""

    agreed = True


class TokenBatch(NamedTuple):
    """A micro-batch of token data: the model reads `input_ids`, the loss compares with `targets`."""

    input_ids: torch.Tensor
    targets: torch.Tensor


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on `device`, structure kept. Copies from pinned memory run
    asynchronously (the DataLoader pins on CUDA); nothing here waits for the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, TokenBatch):
        return TokenBatch(*(to_device(t, device) for t in batch))
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(module: Callable[..., Any], batch: Any) -> Any:
    """Run `module` on one micro-batch by the batch conventions above."""
    if isinstance(batch, TokenBatch):
        return module(batch.input_ids)
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    return module(batch)


def logits_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)):
        return outputs[0] if outputs and isinstance(outputs[0], torch.Tensor) else None
    return getattr(outputs, "logits", None)


def output_loss(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, (torch.Tensor, tuple, list)):
        return None
    return getattr(outputs, "loss", None)


def example_count(batch: Any) -> int:
    """Examples in a micro-batch: the leading size of its first tensor (known without a device sync)."""
    if isinstance(batch, TokenBatch):
        return batch.input_ids.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for v in items:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise HookError("data.collate: a batch holds no tensor with a batch dimension; return tensors from collate")


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross entropy in fp32 (targets already aligned with the logits)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def is_causal_lm(model: nn.Module) -> bool:
    """True for HuggingFace causal language models, whose loss from `labels` is shifted by one."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _pair(value: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | int]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise HookError(f"{where} must be a (sum, count) pair, got {type(value).__name__}")
    total, count = value
    if not (isinstance(total, torch.Tensor) and total.dim() == 0):
        raise HookError(f"{where}: the sum must be a scalar tensor, got "
                        f"{type(total).__name__}{tuple(total.shape) if isinstance(total, torch.Tensor) else ''}")
    if isinstance(count, torch.Tensor):
        if count.dim() != 0:
            raise HookError(f"{where}: the count must be a number or a scalar tensor, got shape {tuple(count.shape)}")
    elif isinstance(count, bool) or not isinstance(count, (int, float)):
        raise HookError(f"{where}: the count must be a number, got {type(count).__name__}")
    return total, count


class Objective:
    """Turns (outputs, batch) into (loss sum, count) and validation metrics, by the rules above."""

    def __init__(self, *, loss_fn: Callable[[Any, Any], Any] | None = None,
                 metrics_fn: Callable[[Any, Any], Any] | None = None, ignore_index: int = -100,
                 causal_lm: bool = False) -> None:
        self.loss_fn, self.metrics_fn = loss_fn, metrics_fn
        self.ignore_index, self.causal_lm = ignore_index, causal_lm

    def loss(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(sum, count) of one micro-batch; the sum carries the graph for backward."""
        if self.loss_fn is not None:
            value = self.loss_fn(outputs, batch)
            if isinstance(value, torch.Tensor):
                if value.dim() != 0:
                    raise HookError(f"model.loss_fn returned a tensor of shape {tuple(value.shape)}; return a "
                                    "scalar mean or a (sum, count) pair")
                n = example_count(batch)
                return value.float() * n, n
            total, count = _pair(value, "model.loss_fn's result")
            return total.float(), count
        loss = output_loss(outputs)
        if loss is not None:
            count = self._label_count(batch)
            return loss.float() * count, count
        if isinstance(batch, TokenBatch):
            logits = logits_of(outputs)
            if logits is None:
                raise HookError("the model's output has no logits; return logits (a tensor, or `logits` in a "
                                "mapping) or set model.loss_fn")
            return lm_loss_sum(logits, batch.targets, self.ignore_index), batch.targets.numel()
        raise HookError("no loss: the model returned no `loss` and the data is not token data; set "
                        "model.loss_fn='pkg.module:fn' (see docs/data.md)")

    def _label_count(self, batch: Any) -> torch.Tensor | int:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            return example_count(batch)
        if self.causal_lm:
            labels = labels[..., 1:]
        return (labels != self.ignore_index).sum()

    def metrics(self, outputs: Any, batch: Any) -> dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]:
        if self.metrics_fn is None:
            return {}
        value = self.metrics_fn(outputs, batch)
        if not isinstance(value, Mapping):
            raise HookError(f"eval.metrics_fn must return {{name: (sum, count)}}, got {type(value).__name__}")
        out = {}
        for name, pair in value.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise HookError(f"eval.metrics_fn: metric name {name!r} must be an identifier")
            total, count = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
            if total is None or not all(isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool)
                                        and (not isinstance(v, torch.Tensor) or v.dim() == 0)
                                        for v in (total, count)):
                raise HookError(f"eval.metrics_fn: {name!r} must be a (sum, count) pair of scalars")
            out[name] = (total, count)
        return out
