"""`scaletrain convert CKPT --to SPEC [--world N] [--out DIR]`: a tag of any backend rewritten ahead of
time as a tag of another backend (and world size), weights, AdamW moments and steps included.

Resuming converts on the fly already (`checkpoint.portable`); converting ahead saves a large job from
holding every rank while rank files are cut apart at start-up, and leaves a tag the target backend
loads natively.

How: the target engine runs on `--world` local CPU processes over gloo (a fresh process group of its
own; torch-native targets default to 1 process, since their DCP tag reshards to any world on load;
a backend whose files are one partition per rank, DeepSpeed's, declares it (`Backend.fixed_world`)
and needs `--world`). Each process builds the
engine from the tag's own config (meta.json) with SPEC's overrides, loads the tag through the portable
route (the same code a converting resume runs, so the result resumes identically), and the engine
saves it through `CheckpointManager.save`: written beside, hashed, meta.json written last, renamed
into `DIR/step_XXXXXXXX`, `DIR/latest` pointing at it. Memory per process: the target engine's share
of the model and optimizer state plus one parameter's full tensors while loading.

The source is verified first (sizes and sha256 of every file): a damaged tag is refused with one line
(exit 2) and nothing is written. Default DIR: `<run>/converted/<spec>-w<N>/`. Resume from it with
`checkpoint.resume=DIR`.

Imports: torch, `scaletrain.checkpoint` (`layout`, `manager`), `scaletrain.config`, `scaletrain.dist`,
`scaletrain.engines`, `scaletrain.errors`, `scaletrain.model.build`, `scaletrain.optim`, `scaletrain.procs`
(the conversion processes: their own session, dying with this one, stopped as a group).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import traceback
from pathlib import Path
from typing import Any

from scaletrain.checkpoint import layout
from scaletrain.errors import CheckpointError, ConfigError, ScaletrainError
from scaletrain.procs import free_port, stop_children, tie_to_parent

log = logging.getLogger(__name__)

TIMEOUT_S = 6 * 3600.0


def _resolve_tag(ckpt: Path) -> Path:
    if (ckpt / layout.META_FILE).is_file():
        return ckpt
    if (ckpt / layout.LATEST_FILE).is_file():
        return layout.resolve_tag(ckpt)
    raise CheckpointError(f"convert: {ckpt} is neither a tag (with meta.json) nor a ckpt folder with `latest`")


def _verified_meta(tag: Path) -> dict[str, Any]:
    info = layout.check_tag(tag)
    if info.meta is not None:
        info = layout.check_tag(tag, digests=layout.digest_files(tag, sorted(info.meta["files"])))
    if not info.intact:
        raise CheckpointError(f"convert: {tag} is damaged ({info.problems[0] if info.problems else 'no meta.json'}); "
                              "convert an intact tag (scaletrain inspect --verify lists them)")
    return dict(info.meta)


def target_config(meta: dict[str, Any], spec: str) -> Any:
    """The tag's own config with the target backend of `spec`, as a whole (`registry.spec_tree`)."""
    from scaletrain.config import build_config
    from scaletrain.engines.registry import spec_tree

    tree = json.loads(json.dumps(meta.get("config") or {}))
    if not tree:
        raise CheckpointError("convert: the tag's meta.json holds no config; it was not written by `scaletrain train`")
    tree.setdefault("model", {})["init_from"] = None  # the weights come from the tag
    return build_config(spec_tree(tree, spec))


def _worker(rank: int, world: int, port: int, parent: int, args: tuple, results: Any) -> None:
    """One conversion process (spawned): in a session of its own, dying with the converting process, so
    a killed `scaletrain convert` leaves no process waiting in a collective."""
    tie_to_parent(parent, new_session=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        results.put((rank, None, _convert_rank(*args)))
    except ScaletrainError as e:
        results.put((rank, str(e), None))
    except BaseException:
        results.put((rank, traceback.format_exc().strip().splitlines()[-1], None))


def _convert_rank(tag: Path, meta: dict[str, Any], spec: str, out: Path) -> str | None:
    """Collective on the conversion's process group: build the target engine, load, save."""
    import torch

    from scaletrain import dist
    from scaletrain.checkpoint.manager import CheckpointManager
    from scaletrain.config import resolve_grad_accum
    from scaletrain.engines import registry
    from scaletrain.engines.base import EngineSpec
    from scaletrain.model.build import build_model
    from scaletrain.optim import build_adamw

    cfg = target_config(meta, spec)
    ctx = dist.init(dist.current_launch(), timeout_s=cfg.backend.timeout_s, device="cpu")
    try:
        registry.validate(cfg, ctx.world_size)
        vocab = (meta.get("model") or {}).get("vocab_size")
        es = EngineSpec(ctx=ctx, precision=cfg.precision,
                        grad_accum=resolve_grad_accum(cfg.train, ctx.world_size // cfg.backend.tp_size),
                        grad_clip=cfg.train.grad_clip, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
                        model_factory=lambda: build_model(cfg.model, vocab),
                        optimizer_factory=lambda m: build_adamw(m, cfg.optim, device_type=ctx.device_type),
                        checkpoint_format=cfg.checkpoint.format, allow_tf32=cfg.train.allow_tf32)
        torch.manual_seed(cfg.run.seed)
        engine = registry.build_engine(es, cfg)
        client = engine.load_checkpoint(tag, {**meta, "own_run": False, "portable": True})
        step = int(meta["step"])
        new_meta = {
            "backend": cfg.backend.kind, "backend_spec": registry.spec_of(cfg), "world_size": ctx.world_size,
            "precision": cfg.precision, "format": engine.checkpoint_format, "tokens": meta.get("tokens"),
            "val_loss": meta.get("val_loss"), "config": cfg.to_json_dict(), "model": meta.get("model"),
            "converted_from": {"tag": tag.name, "backend_spec": meta.get("backend_spec"),
                               "world_size": meta.get("world_size"), "run_id": meta.get("run_id")},
        }
        manager = CheckpointManager(out, cfg.checkpoint.model_copy(update={"async_save": False, "keep_last": 1,
                                                                           "on_error": "fail"}), ctx)
        manager.save(engine, step, client, new_meta)
        engine.close()
        return str(out / layout.tag_name(step))
    finally:
        dist.teardown()


def convert(ckpt: Path, spec: str, *, world: int | None = None, out: Path | None = None,
            timeout_s: float = TIMEOUT_S) -> Path:
    from scaletrain.engines.registry import fixed_world

    tag = _resolve_tag(Path(ckpt))
    why = fixed_world(spec)  # a bad spec fails here, before anything is read
    if world is None:
        if why:
            raise ConfigError(f"convert --to {spec}: {why}; pass --world N, the number of processes the run "
                              "will resume on")
        world = 1
    if world < 1:
        raise ConfigError(f"convert --world {world}: must be at least 1")
    meta = _verified_meta(tag)
    out = Path(out) if out else tag.parent.parent / "converted" / f"{spec.replace(':', '-')}-w{world}"
    final = out / layout.tag_name(int(meta["step"]))
    if final.exists():
        raise CheckpointError(f"convert: {final} exists; remove it or choose another --out")
    if out.resolve().is_relative_to(tag.resolve()) or tag.resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"convert: --out {out} overlaps the source tag {tag}; choose another folder")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, os.getpid(), (tag, meta, spec, out), results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    errors: list[str] = []
    written = None
    try:
        for _ in range(world):
            try:
                rank, err, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise CheckpointError(f"convert: the {world} conversion processes did not finish within "
                                      f"{timeout_s:.0f} s") from None
            if err:
                errors.append(err)
                break  # the others may wait in a collective: stop them below
            if rank == 0:
                written = value
    finally:  # done: they are exiting; failed: the others may wait in a collective
        stop_children(procs, wait_s=10 if not errors else 1)
    if errors:
        raise CheckpointError(errors[0] if errors[0].startswith(("convert", "checkpoint")) else f"convert: {errors[0]}")
    return Path(written) if written else final
