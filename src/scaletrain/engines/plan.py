"""`scaletrain plan`: memory per rank of every backend, before launch (formulas: docs/plan.md).

    scaletrain plan [--config F] [key=value ...] --world N [--backends ddp,fsdp,deepspeed:3,...]
                    [--device-memory 80GB] [--procs-per-node P] [--json]

`plan_memory(cfg, world, spec)` is pure: no process group, no allocation. The model is built on the
meta device (user factories and Hugging Face models included) so every parameter's shape is known
exactly, tied weights once; then the backend's own planner (`Backend.plan`, in its module under
`scaletrain.engines.backends`, on the shared pieces of `scaletrain.engines.memory`) lays those shapes
out the way its engine does:

  model state   parameters, gradients and optimizer state this rank holds, tensor by tensor, with
                the engine's padding (FSDP2 pads dim 0 to the shard count; ZeRO-1/2 flatten each
                param group aligned to 2 x world; ZeRO-3 pads each parameter to the world size)
  buffers       what the engine allocates besides model state at its peak: DDP's gradient buckets,
                FSDP's gathered (unsharded) parameters and one unit's unsharded gradients, DeepSpeed's
                reduce bucket and ZeRO-3's gathered / prefetched parameters
  activations   what one micro batch saves for backward (built-in GPT, or a Hugging Face decoder by
                its config), with or without activation checkpointing, plus the logits and the loss

Bytes are per rank; the rank reported is the one holding the most (ranks differ by padding and, for
ZeRO-1/2, by which whole parameters overlap their partition). Host bytes (CPU offload) are listed
apart from device bytes. `plan_every_backend` plans every registered backend's default specs (what
`scaletrain plan` shows without --backends). Imports: `scaletrain.config`, `scaletrain.data.format`,
`scaletrain.engines.memory`, `scaletrain.engines.registry`, `scaletrain.errors`, `scaletrain.model`
(`build`, `gpt`, `materialize`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from scaletrain.config import Config, build_config
from scaletrain.engines import registry
from scaletrain.engines.memory import BYTES, Layout, tensors_of
from scaletrain.errors import ConfigError


@dataclass
class Estimate:
    """Bytes per rank. params/grads/optimizer/buffers/activations are on the device; host is CPU memory."""

    spec: str
    world: int
    rank: int
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    host: int = 0
    device_memory: int | None = None
    n_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> int:
        """Parameters, gradients and optimizer state wherever they live (device and host)."""
        return self.params + self.grads + self.optimizer + self.host

    @property
    def total(self) -> int:
        """Device bytes at the peak of a step."""
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_state": self.model_state, "total": self.total, "fits": self.fits}


# ---------------------------------------------------------------------------------------------
# inputs


def parse_bytes(text: str, key: str = "--device-memory") -> int:
    """`80GB`, `80GiB`, `512MB`, `1.5TB`, or plain bytes; GB is 10^9, GiB 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"{key} {text!r}: expected a size such as 80GB, 80GiB or 512MB")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def parse_backends(text: str) -> list[str]:
    """A comma-separated list of backend specs, each checked by the registry's grammar."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--backends: empty; give specs such as ddp,fsdp,deepspeed:3")
    for s in specs:
        registry.spec_overrides(s)
    return specs


def with_spec(cfg: Config, spec: str) -> Config:
    """`cfg` with the backend a spec names, as a whole (`registry.spec_tree`)."""
    return build_config(registry.spec_tree(cfg.model_dump(mode="json", by_alias=True), spec))


def _vocab_size(cfg: Config) -> int | None:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.factory is not None:
        return None  # a user model may not need one
    from scaletrain.data.format import read_meta
    from scaletrain.errors import DataError

    try:
        return read_meta(cfg.data.path, cfg.data.vocab_size).vocab_size
    except DataError as e:
        if cfg.model.factory is not None:
            return None
        raise ConfigError(f"model.vocab_size is not set and the data's vocabulary cannot be read ({e}); "
                          "set model.vocab_size=N") from None


def _meta_model(cfg: Config, vocab: int | None) -> Any:
    from scaletrain.model.build import build_model
    from scaletrain.model.materialize import build_on_meta

    return build_on_meta(lambda: build_model(cfg.model, vocab))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# activations


def _model_dims(model: Any, cfg: Config) -> dict[str, int] | None:
    """Layers, width, heads, MLP width, key/value width and vocabulary: built-in GPT or HF config."""
    from scaletrain.model.gpt import GPT

    if isinstance(model, GPT):
        m = cfg.model
        return {"layers": m.n_layer, "h": m.n_embd, "heads": m.n_head, "ffn": 4 * m.n_embd, "kv": m.n_embd,
                "vocab": model.lm_head.out_features, "kind": 0}
    hf = getattr(model, "config", None)
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if hf is None or not all(getattr(hf, k, None) for k in need):
        return None
    h, heads = hf.hidden_size, hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or h // heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    return {"layers": hf.num_hidden_layers, "h": h, "heads": heads,
            "ffn": getattr(hf, "intermediate_size", None) or 4 * h, "kv": kv_heads * head_dim,
            "vocab": hf.vocab_size, "kind": 1}


def activation_bytes(dims: dict[str, int] | None, *, micro_batch: int, seq: int, precision: str,
                     checkpointing: bool, tp: int = 1) -> int | None:
    """Saved-for-backward bytes of one micro batch (docs/plan.md#activations). None: unknown model."""
    if dims is None:
        return None
    bs, h, L, f, kv, v = micro_batch * seq, dims["h"], dims["layers"], dims["ffn"], dims["kv"], dims["vocab"]
    a = BYTES[precision]
    if dims["kind"] == 0:  # built-in GPT: x, ln_1 out, x2, ln_2 out whole; qkv, attn out, its copy, fc, gelu split
        whole, split = 4 * h, 3 * h + 2 * h + 2 * f
    else:  # HF decoder (Llama-like): x, 2 norms out, x2 whole; q, k, v, roped q and k, attn out, o_proj in, 4 MLP
        whole, split = 4 * h, 4 * h + 3 * kv + 4 * f
    per_layer = bs * (whole + split // tp) * a + bs * dims["heads"] // tp * 4  # + the attention's log-sum-exp (fp32)
    blocks = (L * bs * h * a + per_layer) if checkpointing else L * per_layer  # AC: block inputs + one recomputed
    head = bs * h * a + bs * v * a + 2 * bs * v * 4  # ln_f out, logits, fp32 log-softmax and its gradient
    return blocks + head


def plan_memory(cfg: Config, world: int, spec: str | None = None, *, rank: int | None = None,
                procs_per_node: int | None = None, device_memory: int | None = None,
                vocab_size: int | None = None) -> Estimate:
    """Per-rank bytes of `spec` (default: the config's own backend) at `world` processes.

    `rank=None` reports the rank that holds the most. Raises ConfigError on bad input."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"--world {world!r}: expected a positive number of processes")
    if spec is not None:
        cfg = with_spec(cfg, spec)
    name = registry.spec_of(cfg) if spec is None else spec
    registry.validate(cfg, world)
    vocab = vocab_size if vocab_size is not None else _vocab_size(cfg)
    model = _meta_model(cfg, vocab)
    layout = Layout(cfg, model, tensors_of(model), world, procs_per_node or world)
    if rank is not None and not 0 <= rank < world:
        raise ConfigError(f"rank {rank}: must be in [0, {world})")
    backend = registry.backend(cfg)
    ranks = backend.plan_ranks(world) if rank is None else [rank]
    rank, parts = max(((r, backend.plan(layout, r)) for r in ranks), key=lambda rp: rp[1].model_state)
    act = activation_bytes(_model_dims(model, cfg), micro_batch=cfg.train.micro_batch_size,
                           seq=cfg.model.block_size, precision=cfg.precision,
                           checkpointing=backend.activation_checkpointing(cfg), tp=cfg.backend.tp_size)
    notes = []
    if act is None:
        notes.append("activations unknown for this model (no GPT or Hugging Face decoder config): 0 counted")
    return Estimate(spec=name, world=world, rank=rank, params=parts.params, grads=parts.grads,
                    optimizer=parts.optimizer, buffers=parts.buffers, activations=act or 0, host=parts.host,
                    device_memory=device_memory, n_params=sum(t.numel for t in layout.tensors), notes=notes)


def plan_every_backend(cfg: Config, world: int, **kw: Any) -> tuple[list[Estimate], list[str]]:
    """Every registered backend's default specs (the config's own first, when it is not among them).

    A spec its backend refuses at this world size or for this model (`validate`: tensor parallel that
    does not divide the world or the heads, a hybrid shard group, a DeepSpeed JSON that disagrees) is
    left out, with a note saying why; any other error is the config's own and raises."""
    own = registry.spec_of(cfg)
    specs = registry.default_specs()
    if own not in specs:
        specs.insert(0, own)
    rows, notes = [], []
    for spec in specs:
        mine = spec == own  # the config as it is, not only what its spec says
        try:
            registry.validate(cfg if mine else with_spec(cfg, spec), world)
        except ConfigError as e:
            notes.append(f"{spec} left out: {e}")
            continue
        rows.append(plan_memory(cfg, world, None if mine else spec, **kw))
    return rows, notes


__all__ = ["Estimate", "parse_backends", "parse_bytes", "plan_every_backend", "plan_memory", "with_spec"]
