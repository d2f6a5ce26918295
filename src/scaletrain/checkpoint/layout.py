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
so a crash mid-save leaves earlier tags and `latest` untouched. Imports no torch: `scaletrain.errors`,
`scaletrain.io` (the durable writes).
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
from scaletrain.io import fsync_dir, write_atomic

# Callers write through this module's names (`layout.write_atomic`, `layout.fsync_tree`); the one
# implementation of each durable write is `scaletrain.io`.
from scaletrain.io import fsync_tree as fsync_tree

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
BEST_FILE = "best"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"  # a rotated-out tag: renamed first, deleted after, collected at start
OLD_PREFIX = ".old-"  # the previous copy of a step being saved again, until the new copy is in place
RUN_ID_FILE = ".run_id"  # names the run that owns this ckpt/ folder (recorded in every meta.json)

# What an engine's files look like inside a tag: the one place that tells the formats apart.
DCP_DIR = "dcp"  # torch-native sharded: PyTorch Distributed Checkpoint
MODEL_FILE = "model.pt"  # torch-native full: one state dict
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own files
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


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named file of a tag: the one checksum walk that save, verify, inspect
    and consolidate share. A file that cannot be read (or whose name escapes the tag) gets an
    `error` instead of a digest, so it counts as damaged rather than disappearing from the check."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            f = safe_relpath(tag_dir, name)
            out[name] = {"size": f.stat().st_size, "sha256": file_digest(f)}
        except (OSError, CheckpointError) as e:
            out[name] = {"error": getattr(e, "strerror", None) or str(e)}
    return out


def detect_format(tag_dir: Path) -> str:
    """"deepspeed", "sharded" (DCP) or "full": which engine files a tag holds."""
    if (tag_dir / DEEPSPEED_DIR).is_dir():
        return "deepspeed"
    if (tag_dir / DCP_DIR / ".metadata").is_file():
        return "sharded"
    if (tag_dir / MODEL_FILE).is_file():
        return "full"
    raise CheckpointError(f"{tag_dir}: no {DEEPSPEED_DIR}/, {DCP_DIR}/.metadata or {MODEL_FILE}: not a scaletrain "
                          "checkpoint tag")


def list_files(tag_dir: Path) -> list[str]:
    """Every file under a tag, as sorted relative POSIX paths, meta.json excluded."""
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != META_FILE
    )


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


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def meta_problems(meta: Any) -> list[str]:
    """What is wrong with the structure of a meta.json (empty when it is well formed)."""
    if not isinstance(meta, dict):
        return ["the top level is not an object"]
    problems = []
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) or meta["step"] < 0:
        problems.append("'step' is not a non-negative integer")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        problems.append(f"format_version {version!r} is newer than this scaletrain reads ({FORMAT_VERSION}); "
                        "upgrade scaletrain")
    files = meta.get("files")
    if not isinstance(files, dict):
        return [*problems, "'files' is not a mapping of file name to size and sha256"]
    for name, rec in files.items():
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool)
                and isinstance(rec.get("sha256"), str) and _SHA256_HEX.match(rec["sha256"])):
            problems.append(f"'files' entry {name!r} lacks an integer size and a sha256")
    return problems


def read_meta(tag_dir: Path) -> dict[str, Any] | None:
    """A tag's meta.json when it exists and is well formed, else None (see `check_tag` for why)."""
    try:
        meta = json.loads((tag_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if not meta_problems(meta) else None


def check_tag(tag_dir: Path, *, digests: dict[str, dict[str, Any]] | None = None) -> TagInfo:
    """Sizes always; checksums when `digests` (from `digest_files`) is given: then a listed file
    without a digest, or one that could not be read, is damage too."""
    try:
        raw = json.loads((tag_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return TagInfo(tag_dir.name, tag_dir, None, (f"{META_FILE} missing or unreadable",))
    if bad := meta_problems(raw):
        return TagInfo(tag_dir.name, tag_dir, None, tuple(f"{META_FILE}: {p}" for p in bad))
    problems = []
    for name, rec in sorted(raw["files"].items()):
        try:
            f = safe_relpath(tag_dir, name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        got = (digests or {}).get(name)
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != rec["size"]:
            problems.append(f"{name}: {f.stat().st_size} bytes, expected {rec['size']}")
        elif digests is not None and got is None:
            problems.append(f"{name}: no checksum computed")
        elif got is not None and "error" in got:
            problems.append(f"{name}: unreadable ({got['error']})")
        elif got is not None and got["sha256"] != rec["sha256"]:
            problems.append(f"{name}: checksum mismatch")
    return TagInfo(tag_dir.name, tag_dir, raw, tuple(problems))


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
    """Move a finished temporary tag into place; an older tag of the same name is replaced.

    Re-saving a step: the old copy is first renamed to `.old-<tag>` (still complete, with its
    meta.json), then the new one takes the name. A crash between the two renames leaves the old copy
    under that name, which `clean_tmp` puts back when no tag of that name exists."""
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _remove(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def clean_tmp(ckpt_dir: Path) -> None:
    """Remove leftovers of interrupted saves and rotations (never a complete tag); the old copy of a
    re-saved step whose replacement never arrived is restored under its own name."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            _remove(p)
        elif p.name.startswith(OLD_PREFIX):
            original = p.with_name(p.name[len(OLD_PREFIX):])
            if tag_step(original.name) is not None and not original.exists() and (p / META_FILE).is_file():
                os.replace(p, original)
            else:
                _remove(p)


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
        # Rename first: an interrupted delete then leaves a `.trash-` folder that `clean_tmp` collects,
        # never a `step_` folder without its meta.json.
        trash = p.with_name(f"{TRASH_PREFIX}{p.name}")
        _remove(trash)
        os.replace(p, trash)
        _remove(trash)
        removed.append(p.name)
    return removed


def resolve_tag(ckpt_dir: Path, tag: str | None = None) -> Path:
    """A tag directory by name, or the one `latest` names."""
    name = tag or read_pointer(ckpt_dir)
    if name is None:
        raise CheckpointError(f"{ckpt_dir}: no `latest` file; pass a tag (one of {[p.name for p in tags(ckpt_dir)]})")
    return safe_child(ckpt_dir, name)
