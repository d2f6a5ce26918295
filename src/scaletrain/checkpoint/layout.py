"""The checkpoint directory: tags, atomic commit, `latest`, rotation, manifest and integrity.

```
ckpt/
  latest               names the last complete tag; replaced atomically, written last
  best                 names the tag with the lowest validation loss (kept apart from rotation)
  step_00000100/
    meta.json          written last inside the tag: step, backend, world size, ..., files + sha256
    ...                the engine's own files
```
A tag counts only when its `meta.json` exists. Saves go to `.tmp-<tag>` and are renamed into place,
so a crash mid-save leaves earlier tags and `latest` untouched. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletrain.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
BEST_FILE = "best"
TMP_PREFIX = ".tmp-"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def safe_child(root: Path, name: str) -> Path:
    """`root/name`, refusing anything that would leave `root` (absolute paths, `..`, links out)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise CheckpointError(f"checkpoint tag {name!r} is not a plain name inside {root}")
    return _inside(root, root / name, name)


def safe_relpath(root: Path, rel: str) -> Path:
    """`root/rel` for a relative POSIX path from a manifest, refusing `..`, absolute paths and links out."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"file name {rel!r} in {root / META_FILE} is not a plain relative path")
    return _inside(root, root.joinpath(*parts), rel)


def _inside(root: Path, child: Path, name: str) -> Path:
    try:
        child.resolve().relative_to(root.resolve())
    except ValueError:
        raise CheckpointError(f"checkpoint path {name!r} escapes {root}; remove the link or fix the name") from None
    return child


def fsync_dir(path: Path) -> None:
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


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(tag_dir: Path) -> list[str]:
    """Every file under a tag, as sorted relative POSIX paths, meta.json excluded."""
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != META_FILE
    )


def fsync_tree(tag_dir: Path, names: list[str]) -> None:
    for name in names:
        with open(tag_dir / name, "rb") as f:
            os.fsync(f.fileno())
    for d in {(tag_dir / n).parent for n in names} | {tag_dir}:
        fsync_dir(d)


@dataclass(frozen=True)
class TagInfo:
    tag: str
    path: Path
    meta: dict[str, Any] | None
    problems: tuple[str, ...]

    @property
    def step(self) -> int:
        return int(self.meta["step"]) if self.meta else (tag_step(self.tag) or -1)

    @property
    def intact(self) -> bool:
        return self.meta is not None and not self.problems


def read_meta(tag_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and "files" in meta and "step" in meta else None


def check_tag(tag_dir: Path, *, digests: dict[str, str] | None = None) -> TagInfo:
    """Sizes always; checksums when `digests` (name -> sha256, computed by the caller) is given."""
    meta = read_meta(tag_dir)
    if meta is None:
        return TagInfo(tag_dir.name, tag_dir, None, (f"{META_FILE} missing or unreadable",))
    problems = []
    for name, rec in sorted(meta["files"].items()):
        try:
            f = safe_relpath(tag_dir, name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != rec["size"]:
            problems.append(f"{name}: {f.stat().st_size} bytes, expected {rec['size']}")
        elif digests is not None and name in digests and digests[name] != rec["sha256"]:
            problems.append(f"{name}: checksum mismatch")
    return TagInfo(tag_dir.name, tag_dir, meta, tuple(problems))


def tags(ckpt_dir: Path) -> list[Path]:
    """Tag directories (complete or not), oldest first by step. Symlinked tags are never listed:
    a tag is a real folder inside the checkpoint dir (`safe_child` refuses one named explicitly)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if not p.is_symlink() and p.is_dir() and tag_step(p.name) is not None]
    return sorted(found, key=lambda p: tag_step(p.name) or 0)


def read_pointer(ckpt_dir: Path, name: str = LATEST_FILE) -> str | None:
    try:
        tag = (ckpt_dir / name).read_text().strip()
    except OSError:
        return None
    return tag or None


def write_meta(tag_dir: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    body = {**meta, "format_version": FORMAT_VERSION, "files": files}
    write_atomic(tag_dir / META_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")


def tmp_dir_for(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f"{TMP_PREFIX}{tag}"


def commit(tmp: Path, final: Path) -> None:
    """Move a finished temporary tag into place; an older tag of the same name is replaced."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def clean_tmp(ckpt_dir: Path) -> None:
    """Remove leftovers of interrupted saves (never a complete tag)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def rotate(ckpt_dir: Path, keep_last: int, *, protect: set[str], upto_step: int | None = None) -> list[str]:
    """Delete complete tags beyond the newest `keep_last`, never one named in `protect`.

    With `upto_step` (the step just committed) only tags up to it count: tags of later steps are left
    from a timeline that a fallback resume abandoned; they must not push the new tags out, and the
    run replaces them as it reaches their steps."""
    complete = [p for p in tags(ckpt_dir) if (p / META_FILE).is_file()]
    if upto_step is not None:
        complete = [p for p in complete if (tag_step(p.name) or 0) <= upto_step]
    removed = []
    for p in complete[:-keep_last] if keep_last > 0 else []:
        if p.name in protect:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def resolve_tag(ckpt_dir: Path, tag: str | None = None) -> Path:
    """A tag directory by name, or the one `latest` names."""
    name = tag or read_pointer(ckpt_dir)
    if name is None:
        raise CheckpointError(f"{ckpt_dir}: no `latest` file; pass a tag (one of {[p.name for p in tags(ckpt_dir)]})")
    return safe_child(ckpt_dir, name)
