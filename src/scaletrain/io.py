"""Writing an output folder safely: the one rule for every command that fills a folder
(`prepare`, `consolidate --force`, weight exports).

The rule: an existing non-empty folder is refused unless `force`; the new content is written into a
temporary sibling and renamed into place, so readers see the old folder or the complete new one,
never a half-written one. Imports: `scaletrain.errors` only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from scaletrain.errors import ScaletrainError


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
        _fsync_tree(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
