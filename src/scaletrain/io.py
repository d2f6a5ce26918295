"""Durable writes, in one place: a file replaced atomically, a tree made durable, a folder replaced.

- `write_atomic(path, text_or_bytes)`: a temporary file in the same folder, fsynced, renamed over
  `path` (`os.replace`), then the folder fsynced, so readers (and a crash) see the old content or the
  new, never a mix, and the new name survives power loss. Pointers (`latest`, `best`), meta.json,
  metrics.jsonl on resume, the run lease use it.
- `fsync_tree(root, names)`: every named file (default: every file below `root`) and every folder
  holding one, so a later rename publishes content that is on disk.
- `replace_dir(out_dir, force=...)`: the one rule for every command that fills a folder (`prepare
  --out`, so far): an existing non-empty folder is refused unless `force`; the new content is written
  into a temporary sibling and renamed into place, so readers see the old folder or the complete new
  one, never a half-written one.

Imports: `scaletrain.errors` only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from scaletrain.errors import ScaletrainError


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable. Best effort: a file system that cannot
    fsync a folder (some network mounts) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) so that readers see the old or the new
    content, never a mix: temporary sibling, fsync, `os.replace`, fsync of the folder. On failure the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path, names: Iterable[str] | None = None) -> None:
    """fsync the files `names` (relative POSIX paths; default every file below `root`), then every
    folder that holds one, `root` included."""
    root = Path(root)
    if names is None:
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    folders = {root}
    for name in names:
        with open(root / name, "rb") as f:
            os.fsync(f.fileno())
        folders.add((root / name).parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        fsync_dir(folder)


@contextlib.contextmanager
def replace_dir(
    out_dir: Path, *, force: bool, what: str = "output", error: type[ScaletrainError] = ScaletrainError
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out_dir`; on success it becomes `out_dir`.

    Refuses (with `error`, one line) a path that is a file or a symlink, and a non-empty folder
    without `force`. On any exception the temporary folder is removed and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise error(f"{what}: {out_dir} is a symlink; pass a real folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{what}: {out_dir} is a file, not a folder; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise error(f"{what}: {out_dir} is not empty; pass --force to replace it, or choose another folder")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise error(f"{what}: cannot write next to {out_dir}: {e.strerror or e}") from None
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

