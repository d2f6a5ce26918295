"""`scaletrain inspect CKPT_DIR`: a table of the tags in a checkpoint folder, and `--verify`.

Without `--verify` a tag is "intact" when its meta.json is readable and every listed file has the
recorded size; `--verify` also re-computes every sha256 and names each damaged file.
Exit codes: 0 all listed tags intact; 1 `--verify` found a damaged or incomplete tag (the table and a
line per damaged file say which); 2 bad input (no such folder). Runs in one process, no torch.

Imports: rich, `scaletrain.checkpoint.layout`, `scaletrain.errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaletrain.checkpoint import layout
from scaletrain.errors import CheckpointError


def scan(ckpt_dir: Path, *, verify: bool = False) -> list[dict[str, Any]]:
    """One record per tag folder (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"inspect: {ckpt_dir} is not a folder; pass a run's ckpt/ folder")
    latest = layout.read_pointer(ckpt_dir)
    best = layout.read_pointer(ckpt_dir, layout.BEST_FILE)
    rows = []
    for tag_dir in layout.tags(ckpt_dir):
        info = layout.check_tag(tag_dir)
        if verify and info.meta is not None:
            info = layout.check_tag(tag_dir, digests=layout.digest_files(tag_dir, sorted(info.meta["files"])))
        meta = info.meta or {}
        files = meta.get("files", {})
        rows.append({
            "tag": info.tag, "step": info.step, "backend": meta.get("backend"), "world_size": meta.get("world_size"),
            "precision": meta.get("precision"), "format": meta.get("format"),
            "bytes": sum(int(f["size"]) for f in files.values()), "created": meta.get("created"),
            "val_loss": meta.get("val_loss"), "intact": info.intact, "verified": verify,
            "problems": list(info.problems), "latest": info.tag == latest, "best": info.tag == best,
        })
    return rows


def _pointer_problems(ckpt_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    out = []
    names = {r["tag"]: r for r in rows}
    for pointer in (layout.LATEST_FILE, layout.BEST_FILE):
        name = layout.read_pointer(ckpt_dir, pointer)
        if name is None:
            continue
        try:
            layout.safe_child(ckpt_dir, name)
        except CheckpointError as e:
            out.append(f"{pointer}: {e}")
            continue
        if name not in names:
            out.append(f"{pointer} names {name}, which does not exist")
        elif not names[name]["intact"]:
            out.append(f"{pointer} names {name}, which is damaged; resume falls back to the newest intact tag")
    return out
