"""`scaletrain plan`: memory per rank of every backend, before launch (formulas: docs/plan.md).

    scaletrain plan [--config F] [key=value ...] --world N [--backends ddp,fsdp,deepspeed:3,...]
                    [--device-memory 80GB] [--procs-per-node P] [--json]

`plan_memory(cfg, world, spec)` is pure: no process group, no allocation. The model is built on the
meta device (user factories and Hugging Face models included) so every parameter's shape is known
exactly, tied weights once; then each backend's layout is applied to those shapes the way the engine
lays them out:

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
apart from device bytes. Imports: `scaletrain.config`, `scaletrain.data.format`, `scaletrain.engines.ds_config`,
`scaletrain.engines.registry`, `scaletrain.errors`, `scaletrain.model` (`build`, `gpt`, `materialize`),
`scaletrain.engines.tensor_parallel`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from scaletrain.config import Config, build_config
from scaletrain.errors import ConfigError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq, in the master dtype (fp32)
STEP_BYTES = 4  # torch AdamW keeps `step` as a 0-d fp32 tensor per parameter tensor
ZERO_ALIGN = 2  # DeepSpeed ZeRO-1/2 align each flat group to 2 x world elements (nccl_start_alignment_factor)
DEFAULT_BACKENDS = "ddp,fsdp,fsdp:shard_grad_op,tp:2,deepspeed:1,deepspeed:2,deepspeed:3"


@dataclass(frozen=True)
class Tensor:
    """One distinct parameter: its name, full shape, trainable flag, and (under TP) split dim."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool = True
    decay: bool = True  # optim.param_groups: >= 2 dims decay

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
    from scaletrain.engines.registry import spec_overrides

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--backends: empty; give specs such as ddp,fsdp,deepspeed:3")
    for s in specs:
        spec_overrides(s)
    return specs


def with_spec(cfg: Config, spec: str) -> Config:
    """`cfg` with the backend a spec names (the registry's overrides applied to its tree)."""
    from scaletrain.engines.registry import spec_overrides

    tree = cfg.model_dump(mode="json", by_alias=True)
    # A spec names the whole backend: start from the defaults of the keys it does not set.
    tree["backend"] = {**tree["backend"], "tp_size": 1}
    tree["backend"]["fsdp"] = {**tree["backend"]["fsdp"], "cpu_offload": False}
    ds = tree["backend"]["deepspeed"]
    tree["backend"]["deepspeed"] = {**ds, "stage": None, "offload_optimizer": None, "offload_param": None}
    for key, value in spec_overrides(spec).items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_config(tree)


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


def _tensors(model: Any) -> list[Tensor]:
    out = []
    for name, p in model.named_parameters():  # a tied tensor once, under its first name
        out.append(Tensor(name, tuple(p.shape), p.requires_grad, len(p.shape) >= 2))
    return out


def _tp_split(model: Any, tp: int) -> dict[str, int]:
    """Parameter name -> the dim tensor parallel splits (colwise: 0 for weight and bias; rowwise: 1)."""
    from scaletrain.engines.tensor_parallel import model_plan, resolve_plan

    split = {}
    for module, style in resolve_plan(model, model_plan(model), tp).items():
        split[f"{module}.weight"] = 0 if style == "colwise" else 1
        if style == "colwise":
            split[f"{module}.bias"] = 0
    return split


def _units(model: Any, cfg: Config) -> list[list[str]]:
    """FSDP's units: each block's parameter names, then the root's (everything else)."""
    from scaletrain.model.build import block_classes

    classes = block_classes(model, cfg.backend.fsdp.wrap_classes)
    blocks = [m for m in model.modules() if classes and isinstance(m, classes) and m is not model]
    ids = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            ids.setdefault(id(p), i)
    units: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    for name, p in model.named_parameters():
        units[ids.get(id(p), len(blocks))].append(name)
    return units


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


# ---------------------------------------------------------------------------------------------
# layouts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _local_shape(t: Tensor, split: dict[str, int], tp: int) -> tuple[int, ...]:
    if t.name not in split or tp == 1:
        return t.shape
    d = split[t.name]
    return tuple(n // tp if i == d else n for i, n in enumerate(t.shape))


def _fsdp_rows(shape: tuple[int, ...], shards: int, rank: int) -> tuple[int, int]:
    """(padded elements, this rank's unpadded elements) of FSDP2's dim-0 shard."""
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    d0 = shape[0] if shape else 1
    chunk = _ceil_div(d0, shards)
    mine = min(chunk, max(0, d0 - rank * chunk))
    return chunk * rest, mine * rest


def _torch_native(cfg: Config, model: Any, tensors: list[Tensor], world: int, rank: int,
                  procs_per_node: int) -> dict[str, Any]:
    b = cfg.backend
    tp = b.tp_size
    split = _tp_split(model, tp) if tp > 1 else {}
    fsdp = b.kind == "fsdp"
    pbytes = 4  # parameters are fp32 masters under every torch-native strategy
    gdtype = 4
    p = g = o = 0
    local_numel: dict[str, int] = {}
    if not fsdp:
        for t in tensors:
            p += t.numel * pbytes
            local_numel[t.name] = t.numel
            if t.requires_grad:
                g += t.numel * gdtype
                o += ADAM_MOMENTS * 4 * t.numel + STEP_BYTES
        # DDP's reducer copies gradients into buckets covering every trainable parameter.
        buffers = sum(t.numel for t in tensors if t.requires_grad) * gdtype
        return {"params": p, "grads": g, "optimizer": o, "buffers": buffers, "host": 0,
                "note": "DDP gradient buckets: one more gradient copy"}
    dp = world // tp
    f = b.fsdp
    if f.sharding == "no_shard":
        shards = 1
    elif f.sharding == "hybrid_shard":
        shards = f.shard_group_size or max(procs_per_node // tp, 1)
        if dp % shards:
            raise ConfigError(f"backend.fsdp.shard_group_size ({shards}) must divide the data-parallel size ({dp}); "
                              "set it (or --procs-per-node) to a divisor")
    else:
        shards = dp
    shard_rank = rank // tp % shards
    for t in tensors:
        shape = _local_shape(t, split, tp)
        padded, mine = _fsdp_rows(shape, shards, shard_rank)
        p += padded * pbytes
        local_numel[t.name] = math.prod(shape)
        if t.requires_grad:
            g += padded * gdtype
            o += ADAM_MOMENTS * 4 * mine + STEP_BYTES
    # Gathered parameters at the peak, in the compute dtype.
    cbytes = BYTES[f.param_dtype or cfg.precision]
    units = [sum(local_numel[n] for n in names) for names in _units(model, cfg)]
    blocks, root = units[:-1], units[-1]
    biggest = max(blocks, default=0)
    # FSDP2 gathers into separate unsharded buffers even over a single shard (it copies the shard in).
    if f.sharding in ("shard_grad_op", "no_shard"):
        gathered = sum(units) * cbytes  # every unit stays gathered from its forward to its backward
    else:  # full_shard, hybrid_shard: the root, the block in use and the one prefetched
        gathered = (root + min(2, len(blocks)) * biggest) * cbytes
    reduce = (biggest or root) * BYTES[f.reduce_dtype]  # one unit's unsharded gradients before reduction
    host = 0
    if f.cpu_offload:
        host, p, g, o = p + g + o, 0, 0, 0
    return {"params": p, "grads": g, "optimizer": o, "buffers": gathered + reduce, "host": host}


def _zero_groups(tensors: list[Tensor]) -> list[list[Tensor]]:
    decay = [t for t in tensors if t.requires_grad and t.decay]
    rest = [t for t in tensors if t.requires_grad and not t.decay]
    return [g for g in (decay, rest) if g]


def _deepspeed(cfg: Config, model: Any, tensors: list[Tensor], world: int, rank: int) -> dict[str, Any]:
    from scaletrain.engines.ds_config import offload_on, resolve_ds_config
    from scaletrain.model.build import hidden_size

    ds = resolve_ds_config(cfg, world_size=world, hidden_size=hidden_size(model))  # as the engine resolves it
    zero = ds["zero_optimization"]
    stage = int(zero["stage"])
    off_opt, off_param = offload_on(zero, "offload_optimizer"), offload_on(zero, "offload_param")
    lp = BYTES[cfg.precision]  # the module's own dtype under DeepSpeed (bf16/fp16 modes cast it)
    grad_b = lp
    groups = _zero_groups(tensors)
    frozen = sum(t.numel for t in tensors if not t.requires_grad) * lp
    p = g = o = host = buffers = 0
    if stage in (1, 2):
        for group in groups:
            numel = sum(t.numel for t in group)
            flat = _ceil_div(numel, ZERO_ALIGN * world) * ZERO_ALIGN * world
            part = flat // world
            p += flat * lp  # the module's parameters are views into one flat buffer per group
            # Gradients: every whole parameter that overlaps this rank's partition.
            lo, hi, start = rank * part, (rank + 1) * part, 0
            for t in group:
                end = start + t.numel
                if start < hi and end > lo:
                    g += t.numel * grad_b
                start = end
            # fp32 partition of the parameters (kept even in fp32 training), AdamW's moments, one step.
            o += part * 4 + ADAM_MOMENTS * 4 * part + STEP_BYTES
        p += frozen
        buffers = int(zero.get("reduce_bucket_size", 5e8)) * grad_b  # the reduce (ipg) bucket
        if off_opt:
            host, o, g = o + g, 0, 0
    else:
        threshold = int(zero.get("stage3_param_persistence_threshold", 1e5))
        part_total = persistent = gathered_max = nonpersistent = 0
        for t in tensors:
            part_total += _ceil_div(t.numel, world)
            if t.numel <= threshold:
                persistent += t.numel  # small parameters stay whole on every rank as well
            else:
                nonpersistent += t.numel
        trainable_part = sum(_ceil_div(t.numel, world) for t in tensors if t.requires_grad)
        n_groups = len(groups)
        p = (part_total + persistent) * lp
        g = trainable_part * grad_b  # grad_partitions_flat_buffer
        # fp32 master partition: in fp32 without offload the engine makes it share the parameters'
        # partition (engines.deepspeed_zero._share_fp32_master), otherwise a copy; moments, steps.
        master = 0 if (lp == 4 and not off_opt and not off_param) else trainable_part * 4
        o = master + ADAM_MOMENTS * 4 * trainable_part + STEP_BYTES * n_groups
        units = [sum(t.numel for t in tensors if t.name in set(names) and t.numel > threshold)
                 for names in _units(model, cfg)]
        gathered_max = max(units, default=0)
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
        live = int(zero.get("stage3_max_live_parameters", 1e9))
        # From the second step on DeepSpeed follows the recorded module order and keeps parameters it
        # will reuse gathered, up to stage3_max_live_parameters, plus the prefetch bucket.
        gathered = (min(nonpersistent, max(live, gathered_max)) + min(prefetch, nonpersistent)) * lp
        # The step, one sub-group at a time: the flattened fp32 gradient copy and AdamW's temporary.
        step_tmp = 0 if off_opt else 2 * min(int(zero.get("sub_group_size", 1e9)), trainable_part) * 4
        buffers = gathered + int(zero.get("reduce_bucket_size", 5e8)) * grad_b + step_tmp
        if off_opt:
            host, o, g = o + g, 0, 0
        if off_param:
            host += part_total * lp
            p -= part_total * lp
    return {"params": p, "grads": g, "optimizer": o, "buffers": buffers, "host": host}


def plan_memory(cfg: Config, world: int, spec: str | None = None, *, rank: int | None = None,
                procs_per_node: int | None = None, device_memory: int | None = None,
                vocab_size: int | None = None) -> Estimate:
    """Per-rank bytes of `spec` (default: the config's own backend) at `world` processes.

    `rank=None` reports the rank that holds the most. Raises ConfigError on bad input."""
    from scaletrain.engines.registry import spec_of, validate

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"--world {world!r}: expected a positive number of processes")
    if spec is not None:
        cfg = with_spec(cfg, spec)
    name = spec_of(cfg) if spec is None else spec
    validate(cfg, world)
    procs = procs_per_node or world
    vocab = vocab_size if vocab_size is not None else _vocab_size(cfg)
    model = _meta_model(cfg, vocab)
    tensors = _tensors(model)
    if rank is not None and not 0 <= rank < world:
        raise ConfigError(f"rank {rank}: must be in [0, {world})")

    def at(r: int) -> dict[str, Any]:
        if cfg.backend.kind == "deepspeed":
            return _deepspeed(cfg, model, tensors, world, r)
        return _torch_native(cfg, model, tensors, world, r, procs)

    if rank is None:
        candidates = [0, world - 1] if cfg.backend.kind != "deepspeed" else range(world)
        rank, parts = max(((r, at(r)) for r in candidates),
                          key=lambda rp: rp[1]["params"] + rp[1]["grads"] + rp[1]["optimizer"] + rp[1]["host"])
    else:
        parts = at(rank)
    ac = cfg.backend.fsdp.activation_checkpointing and cfg.backend.kind == "fsdp"
    act = activation_bytes(_model_dims(model, cfg), micro_batch=cfg.train.micro_batch_size,
                           seq=cfg.model.block_size, precision=cfg.precision, checkpointing=ac,
                           tp=cfg.backend.tp_size)
    notes = []
    if act is None:
        notes.append("activations unknown for this model (no GPT or Hugging Face decoder config): 0 counted")
    return Estimate(spec=name, world=world, rank=rank, params=parts["params"], grads=parts["grads"],
                    optimizer=parts["optimizer"], buffers=parts["buffers"], activations=act or 0,
                    host=parts["host"], device_memory=device_memory, n_params=sum(t.numel for t in tensors),
                    notes=notes)


# ---------------------------------------------------------------------------------------------
# command


__all__ = ["Estimate", "parse_backends", "parse_bytes", "plan_memory", "with_spec"]
