"""Saving and resuming through any engine, with the shared rules of `layout` around the engine's files.

save:   rank 0 makes `.tmp-<tag>`; the engine writes into it (collective); the ranks hash the files
        between them; rank 0 writes meta.json, renames the tag into place, then replaces `latest`,
        then rotates. Any failure on any rank is agreed on by all, the temporary folder is removed,
        and earlier tags stay as they were.
resume: trusts only complete tags whose sizes and checksums match; if `latest` names a damaged tag,
        falls back to the newest intact one and says so. A tag the engine refuses (another model's,
        say) is one error agreed on by every rank, so the job prints it once.
Imports: `scaletrain.dist`, `scaletrain.checkpoint.layout`, `scaletrain.config`, `scaletrain.errors`,
`scaletrain.hostmem`.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from scaletrain import dist
from scaletrain.checkpoint import layout
from scaletrain.config import CheckpointConfig
from scaletrain.errors import CheckpointError, ScaletrainError
from scaletrain.hostmem import returning_freed_memory

log = logging.getLogger(__name__)

# What a failed write raises: OSError from Python I/O, RuntimeError from torch.save's C++ writer
# (disk full reads "PytorchStreamWriter failed writing file"), CheckpointException from DCP (which
# already gathers every rank's failure). Anything else is a bug and keeps its traceback.
SAVE_ERRORS = (OSError, RuntimeError, CheckpointException)


def _describe(e: BaseException) -> str:
    """One line for a save error: the OS reason, or the first failing rank's error under DCP."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, failure = sorted(e.failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_describe(inner) if isinstance(inner, BaseException) else inner}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _agree(error: str | None) -> str | None:
    """Collective. The first rank's error, if any rank had one, so every rank takes the same branch."""
    errors = dist.all_gather_object(error)
    for rank, err in enumerate(errors):
        if err:
            return f"rank {rank}: {err}"
    return None


def distributed_digests(tag_dir: Path, names: list[str], ctx: dist.DistContext) -> dict[str, dict[str, Any]]:
    """Collective. `layout.digest_files` of every file, the hashing split across ranks; a file a rank
    could not read comes back with an `error`, never dropped."""
    share = layout.digest_files(tag_dir, names[ctx.rank :: ctx.world_size])
    merged: dict[str, dict[str, Any]] = {}
    for part in dist.all_gather_object(share):
        merged.update(part)
    return merged


def _run_id(ckpt_dir: Path) -> str:
    """Local (rank 0). The id of the run that owns `ckpt_dir`, made on first use. Tags record it, so a
    tag copied in from elsewhere is told apart from one this run folder wrote itself."""
    path = ckpt_dir / layout.RUN_ID_FILE
    try:
        found = path.read_text().strip()
    except OSError:
        found = ""
    if len(found) == 32 and all(c in "0123456789abcdef" for c in found):
        return found
    new = uuid.uuid4().hex
    try:
        layout.write_atomic(path, new + "\n")
    except OSError as e:  # a read-only ckpt/: saves will fail and say so (or warn); the run may go on
        log.warning("cannot record this run's id in %s (%s)", path, e.strerror or e)
    return new


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig, ctx: dist.DistContext) -> None:
        self.dir, self.cfg, self.ctx = ckpt_dir, cfg, ctx
        self._pending: Callable[[], None] | None = None  # finishes an async save
        self.best: tuple[float, str] | None = None
        self.run_id: str | None = None
        if ctx.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            layout.clean_tmp(ckpt_dir)
            self.run_id = _run_id(ckpt_dir)
            best = layout.read_pointer(ckpt_dir, layout.BEST_FILE)
            meta = layout.read_meta(ckpt_dir / best) if best else None
            if meta and meta.get("val_loss") is not None:
                self.best = (float(meta["val_loss"]), best)
        self.best, self.run_id = dist.broadcast_object((self.best, self.run_id))

    # ------------------------------------------------------------------ save

    def should_save(self, step: int, *, is_last: bool, improved: bool = False) -> bool:
        """Local, and the same on every rank. Whether `step` ends with a save: the last step of an
        invocation (the end, `train.stop_at`, or an agreed stop) always does; otherwise every
        `checkpoint.every` steps, or with `checkpoint.policy=best` when an evaluation just beat the best
        validation loss (`improved`)."""
        if is_last:
            return True
        if self.cfg.policy == "best":
            return improved
        return bool(self.cfg.every and step % self.cfg.every == 0)

    def save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Collective. Returns True once the tag is committed (or queued, for an async save)."""
        with returning_freed_memory():  # the engine's state gathered and written: returned once written
            return self._save(engine, step, client_state, meta)

    def _save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> bool:
        self.finish_pending()
        tag = layout.tag_name(step)
        tmp, final = layout.tmp_dir_for(self.dir, tag), self.dir / tag
        started = time.perf_counter()
        err = None
        if self.ctx.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                err = f"cannot create {tmp}: {e.strerror or e}"
        if (err := _agree(err)) is None:
            try:
                engine.save_checkpoint(tmp, client_state, async_save=self.cfg.async_save)
            except SAVE_ERRORS as e:
                err = f"writing {tmp}: {_describe(e)}"
            err = _agree(err)
        if err is not None:
            return self._failed(tmp, err)

        def finish() -> bool:
            error = None
            try:
                engine.wait_for_save()
            except SAVE_ERRORS as e:
                error = f"writing {tmp}: {_describe(e)}"
            if (error := _agree(error)) is None:
                error = self._commit(tmp, final, step, {**meta, "save_seconds": time.perf_counter() - started})
            return self._failed(tmp, error) if error else True

        if self.cfg.async_save and engine.supports_async_save:
            self._pending = finish
            return True
        return finish()

    def finish_pending(self) -> None:
        """Collective. Complete an async save in flight (before the next save, and at the end)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending()

    def _commit(self, tmp: Path, final: Path, step: int, meta: dict[str, Any]) -> str | None:
        """Collective. Hash, write meta.json, rename, point `latest`, rotate. Returns an error or None."""
        err = None
        names: list[str] = []
        if self.ctx.is_main:
            try:
                names = layout.list_files(tmp)
            except OSError as e:
                err = str(e)
        names = dist.broadcast_object(names)
        files = distributed_digests(tmp, names, self.ctx)
        unreadable = sorted(n for n, rec in files.items() if "error" in rec)
        if unreadable and err is None:
            err = f"hashing {tmp}: {unreadable[0]}: {files[unreadable[0]]['error']}"
        if (err := _agree(err)) is not None:
            return err
        if self.ctx.is_main:
            try:
                layout.fsync_tree(tmp, names)
                layout.write_meta(tmp, {**meta, "step": step, "created": time.time(), "run_id": self.run_id}, files)
                layout.commit(tmp, final)
                layout.write_atomic(self.dir / layout.LATEST_FILE, final.name + "\n")
                self._update_best(final.name, meta.get("val_loss"))
                protect = {self.best[1]} if self.best and self.cfg.keep_best else set()
                for gone in layout.rotate(self.dir, self.cfg.keep_last, protect=protect, upto_step=step):
                    log.debug("rotated out %s", gone)
            except OSError as e:
                err = f"committing {final}: {e.strerror or e}"
        err = _agree(err)
        if err is None:
            self.best = dist.broadcast_object(self.best)
            log.info("saved checkpoint %s", final)
        return err

    def _update_best(self, tag: str, val_loss: float | None) -> None:
        if val_loss is None or not self.cfg.keep_best:
            return
        if self.best is None or val_loss < self.best[0]:
            self.best = (float(val_loss), tag)
            layout.write_atomic(self.dir / layout.BEST_FILE, tag + "\n")

    def _failed(self, tmp: Path, err: str) -> bool:
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        message = f"checkpoint save failed ({err}); earlier checkpoints are intact"
        if self.cfg.on_error == "warn":
            log.warning("%s; training goes on (checkpoint.on_error=warn)", message)
            return False
        raise CheckpointError(message + "; fix the cause or set checkpoint.on_error=warn")

    def pointers(self) -> tuple[Path | None, Path | None]:
        """Local. The tags `latest` and `best` name, as paths (None where a pointer is missing or
        names a tag that is not there)."""
        out = []
        for name in (layout.LATEST_FILE, layout.BEST_FILE):
            tag = layout.read_pointer(self.dir, name)
            try:
                path = layout.safe_child(self.dir, tag) if tag else None
            except CheckpointError:
                path = None
            out.append(path if path is not None and path.is_dir() else None)
        return out[0], out[1]

    # ------------------------------------------------------------------ resume

    def _candidates(self) -> tuple[list[Path], str | None]:
        """Tags to try, best first, and the name `latest` gave (for the fallback message). Local."""
        choice = self.cfg.resume
        if choice == "auto":
            latest = layout.read_pointer(self.dir)
            ordered = list(reversed(layout.tags(self.dir)))
            if latest:
                first = layout.safe_child(self.dir, latest)
                ordered = [first] + [p for p in ordered if p != first]
            return ordered, latest
        path = Path(choice)
        if (path / layout.META_FILE).is_file():
            return [path], path.name
        if (path / layout.LATEST_FILE).is_file():
            return [layout.resolve_tag(path)], layout.read_pointer(path)
        raise CheckpointError(f"checkpoint.resume: {path} is neither a tag (with meta.json) nor a ckpt folder")

    def resume(self, engine: Any) -> dict[str, Any] | None:
        """Collective. Load the newest intact tag; None when there is nothing to resume from."""
        if self.cfg.resume == "never":
            return None
        with returning_freed_memory():  # full tensors read and cut into shards: returned once placed
            return self._resume(engine)

    def _resume(self, engine: Any) -> dict[str, Any] | None:
        found: tuple[list[Path], str | None] | str = ([], None)
        if self.ctx.is_main:
            try:
                found = self._candidates()
            except CheckpointError as e:
                found = str(e)  # raised on every rank below, so none waits for the others
        found = dist.broadcast_object(found)
        if isinstance(found, str):
            raise CheckpointError(found)
        candidates, latest = found
        for tag_dir in candidates:
            info = self.verify(tag_dir)
            if info.intact:
                if latest and tag_dir.name != latest:
                    log.warning("latest names %s, which is damaged or incomplete; resuming from %s", latest, tag_dir.name)
                # Whether this run folder wrote the tag: formats that must run foreign code to convert
                # (DeepSpeed's universal checkpoints) refuse tags of other origin.
                meta = {**info.meta, "own_run": info.meta.get("run_id") == self.run_id}
                client_state = self._load_agreed(engine, tag_dir, meta)
                log.info("resumed from %s (step %d)", tag_dir, info.step)
                return client_state
            if info.meta is not None or tag_dir.name == latest:
                log.warning("skipping checkpoint %s: %s", tag_dir.name, "; ".join(info.problems))
        if self.cfg.resume != "auto":
            raise CheckpointError(f"checkpoint.resume: no intact checkpoint at {self.cfg.resume}")
        return None

    def _load_agreed(self, engine: Any, tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Collective. The engine's load, with a refusal (a tag written for another model, say) agreed on
        by every rank: all raise the first rank's error, marked agreed, so the job prints it once."""
        mine: ScaletrainError | None = None
        try:
            client_state = engine.load_checkpoint(tag_dir, meta)
        except ScaletrainError as e:
            mine = e
        first = next((e for e in dist.all_gather_object(str(mine) if mine else None) if e), None)
        if first is not None:
            refusal = mine if mine is not None and str(mine) == first else CheckpointError(first)
            refusal.agreed = True
            raise refusal
        return client_state

    def verify(self, tag_dir: Path) -> layout.TagInfo:
        """Collective. Sizes and checksums of one tag, the hashing split across ranks; the verdict is
        made on rank 0 from every rank's digests and broadcast, so all ranks take the same branch."""
        info = dist.broadcast_object(layout.check_tag(tag_dir) if self.ctx.is_main else None)
        if not info.intact:
            return info
        digests = distributed_digests(tag_dir, sorted(info.meta["files"]), self.ctx)
        return dist.broadcast_object(layout.check_tag(tag_dir, digests=digests) if self.ctx.is_main else None)
