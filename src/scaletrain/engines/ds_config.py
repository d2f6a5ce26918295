"""The DeepSpeed JSON as the engine receives it: read, "auto" filled from the harness config, checked.

The harness config owns batch sizes, clipping, precision and the optimizer; a DeepSpeed JSON owns the
ZeRO layout (stage, offload, buckets). In a JSON, a harness-owned value is `"auto"` (filled here) or
a number that must agree with the harness config: a disagreement is an error listing every
conflicting key with both values, never a silent winner. Without a JSON the dict is built from
`backend.deepspeed.stage` (default 2) and the offload flags.

`resolve_ds_config` is pure and cheap: `loop.plan_run` calls it on every rank before any process
group exists, so a bad JSON fails identically everywhere. Imports no torch and no deepspeed:
`scaletrain.config` and `scaletrain.errors` only.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from scaletrain.config import Config, resolve_grad_accum
from scaletrain.errors import ConfigError

AUTO = "auto"
DEFAULT_STAGE = 2
OFFLOAD_DEVICES = ("cpu", "nvme")

# Bucket and live-parameter limits, in elements, where the JSON does not set them. DeepSpeed's own
# defaults (reduce/allgather buckets 5e8, stage3_max_live_parameters and max_reuse_distance 1e9) are
# sized for multi-billion models on GPUs: a 5e8-element fp32 bucket alone is 2 GB, and a 1e9 live limit
# keeps every gathered parameter of a 150 M model alive, which made ZeRO-3's peak exceed DDP's.
# 2.5e7 elements is 100 MB at fp32 (50 MB at bf16) per bucket: large enough for full-bandwidth
# collectives, small beside a GPU's memory; 5e7 live elements cap what ZeRO-3 keeps gathered.
# ZeRO-3 steps its optimizer one sub-group of the flat partition at a time, and each sub-group's step
# makes a gradient copy and optimizer temporaries of its size: DeepSpeed's 1e9 default makes that the
# whole partition at once; 2.5e7 keeps it at 100 MB (fp32).
ZERO_MEMORY_DEFAULTS: dict[int, dict[str, float]] = {
    1: {"reduce_bucket_size": 2.5e7, "allgather_bucket_size": 2.5e7},
    2: {"reduce_bucket_size": 2.5e7, "allgather_bucket_size": 2.5e7},
    3: {"reduce_bucket_size": 2.5e7, "stage3_prefetch_bucket_size": 2.5e7, "stage3_max_live_parameters": 5e7,
        "stage3_max_reuse_distance": 5e7, "stage3_param_persistence_threshold": 1e4, "sub_group_size": 2.5e7},
}



def model_relative_zero3(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 buffer sizes from the model's width, where the JSON leaves them to the harness: one
    reduce bucket of hidden^2 elements and a prefetch of 0.9 of it (a layer's largest matrix is a few
    hidden^2), kept between 1e6 and 2.5e7 elements; parameters under 10 x hidden elements (biases,
    norms) stay gathered. For a 1024-wide model that is 4 MB per bucket instead of 100 MB."""
    bucket = min(max(hidden_size * hidden_size, 10**6), int(2.5e7))
    return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": int(0.9 * bucket),
            "stage3_param_persistence_threshold": 10 * hidden_size}


# Sections the harness replaces with its own objects: the engine builds AdamW (or DeepSpeedCPUAdam)
# from optim.* and sets the lr of every step from the schedule, so the curves equal DDP's.
HARNESS_SECTIONS = ("optimizer", "scheduler")


def read_ds_json(path: Path) -> dict[str, Any]:
    """The JSON file as a dict; a missing or malformed file is one ConfigError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backend.deepspeed.config: {path} not found; pass an existing DeepSpeed JSON (see ds_configs/)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"backend.deepspeed.config: {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                          f"{e.msg}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"backend.deepspeed.config: {path} cannot be read ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"backend.deepspeed.config: {path} must hold a JSON object at the top level")
    return data


def harness_values(cfg: Config, world_size: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key (dotted) -> (the value the harness config implies, the harness key it comes from)."""
    mb = cfg.train.micro_batch_size
    accum = resolve_grad_accum(cfg.train, world_size)
    values: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (mb, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "train_batch_size": (mb * accum * world_size, f"micro x accum x world ({mb}x{accum}x{world_size})"),
        "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip"),
        "bf16.enabled": (cfg.precision == "bf16", f"precision={cfg.precision}"),
        "fp16.enabled": (cfg.precision == "fp16", f"precision={cfg.precision}"),
        "optimizer.params.lr": (cfg.optim.lr, "optim.lr"),
        "optimizer.params.betas": (list(cfg.optim.betas), "optim.betas"),
        "optimizer.params.eps": (cfg.optim.eps, "optim.eps"),
        "optimizer.params.weight_decay": (cfg.optim.weight_decay, "optim.weight_decay"),
        "scheduler.params.warmup_num_steps": (cfg.schedule.warmup_steps, "schedule.warmup_steps"),
        "scheduler.params.warmup_max_lr": (cfg.optim.lr, "optim.lr"),
        "scheduler.params.total_num_steps": (cfg.train.max_steps, "train.max_steps"),
    }
    if cfg.train.global_batch_size is not None:
        values["gradient_accumulation_steps"] = (accum, "train.global_batch_size")
    return values


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _get(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding the dotted key's last part (None when a parent is missing), and that part."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return (node if isinstance(node, dict) else None), leaf


def _fill_auto(tree: dict[str, Any], harness: dict[str, tuple[Any, str]], conflicts: list[str]) -> None:
    """Fill "auto" (and missing top-level / precision keys) in place; collect disagreements."""
    for key, (value, source) in harness.items():
        holder, leaf = _get(tree, key)
        if holder is None:
            if "." in key and key.split(".")[0] in ("bf16", "fp16"):
                tree.setdefault(key.split(".")[0], {})["enabled"] = value
            continue  # optimizer/scheduler params only matter when the JSON declares those sections
        if leaf not in holder:
            if "." not in key or key.split(".")[0] in ("bf16", "fp16"):
                holder[leaf] = value
        elif holder[leaf] == AUTO:
            holder[leaf] = value
        elif not _same(holder[leaf], value):
            conflicts.append(f"{key}={json.dumps(holder[leaf])} but {source} gives {json.dumps(value)}")


def _leftover_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _leftover_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []


def offload_on(zero: dict[str, Any], section: str) -> bool:
    spec = zero.get(section)
    return isinstance(spec, dict) and str(spec.get("device", "none")).lower() in OFFLOAD_DEVICES


def _zero_section(tree: dict[str, Any], cfg: Config, conflicts: list[str]) -> None:
    """backend.deepspeed.{stage, offload_*} against (or into) the JSON's zero_optimization."""
    ds = cfg.backend.deepspeed
    zero = tree.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("backend.deepspeed.config: zero_optimization must be a JSON object")
    if zero.get("stage", AUTO) == AUTO:
        zero["stage"] = ds.stage if ds.stage is not None else DEFAULT_STAGE
    elif ds.stage is not None and zero["stage"] != ds.stage:
        conflicts.append(f"zero_optimization.stage={zero['stage']} but backend.deepspeed.stage gives {ds.stage}")
    for flag, section in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param")):
        wanted = getattr(ds, flag)
        if wanted is None:
            continue
        if section not in zero:
            if wanted:
                zero[section] = {"device": "cpu", "pin_memory": False}
        elif offload_on(zero, section) != wanted:
            device = zero[section].get("device") if isinstance(zero[section], dict) else zero[section]
            conflicts.append(f"zero_optimization.{section}.device={json.dumps(device)} but "
                             f"backend.deepspeed.{flag} gives {str(wanted).lower()}")


def _check_layout(tree: dict[str, Any], where: str) -> None:
    zero = tree["zero_optimization"]
    stage = zero.get("stage")
    if stage not in (1, 2, 3):
        hint = "; stage 0 is plain data parallel: use backend=ddp" if stage == 0 else ""
        raise ConfigError(f"{where}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r}){hint}")
    if offload_on(zero, "offload_param") and stage != 3:
        raise ConfigError(f"{where}: parameter offload needs ZeRO stage 3 (zero_optimization.stage is {stage}); "
                          "use stage 3 or drop offload_param")
    if offload_on(zero, "offload_optimizer") and stage == 0:
        raise ConfigError(f"{where}: optimizer offload needs ZeRO stage 1, 2 or 3 (zero_optimization.stage is 0)")
    opt = tree.get("optimizer")
    if isinstance(opt, dict) and str(opt.get("type", "AdamW")).lower() not in ("adam", "adamw"):
        raise ConfigError(f"{where}: optimizer.type {opt.get('type')!r}: the harness trains with AdamW "
                          "(optim.*); remove the optimizer section or set type to AdamW")


def resolve_ds_config(cfg: Config, *, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run. Pure: reads the JSON file, touches nothing else.
    With the model's `hidden_size` (known once it is built on meta), ZeRO-3's buffers the JSON leaves
    to the harness are sized from it (`model_relative_zero3`).

    Raises ConfigError naming the file, with every conflicting key and both values in one line.
    """
    path = cfg.backend.deepspeed.config
    where = f"backend.deepspeed.config {path}" if path is not None else "backend.deepspeed"
    tree = copy.deepcopy(read_ds_json(path)) if path is not None else {}
    conflicts: list[str] = []
    _fill_auto(tree, harness_values(cfg, world_size), conflicts)
    _zero_section(tree, cfg, conflicts)
    if conflicts:
        raise ConfigError(f"{where}: {len(conflicts)} value(s) disagree with the harness config: "
                          f"{'; '.join(conflicts)}; set them to \"auto\" or change the harness config")
    _check_layout(tree, where)
    zero = tree["zero_optimization"]
    defaults = dict(ZERO_MEMORY_DEFAULTS[zero["stage"]])
    if hidden_size and zero["stage"] == 3:
        defaults.update(model_relative_zero3(hidden_size))
    for key, value in defaults.items():
        if zero.get(key, AUTO) == AUTO:
            zero[key] = int(value)
    left = _leftover_auto(tree)
    if left:
        raise ConfigError(f"{where}: no harness value fills \"auto\" at {', '.join(left)}; give explicit values there")
    tree.setdefault("steps_per_print", 2**31 - 1)  # the loop logs; keep DeepSpeed's own progress lines off
    tree.setdefault("wall_clock_breakdown", False)
    return tree
