"""`scaletrain consolidate CKPT_DIR`: any checkpoint (DDP/FSDP full or sharded, DeepSpeed ZeRO-1/2/3,
offload included) to one file of plain model weights with canonical names.

Memory stays bounded: a reader (see `readers`) hands over the weights piece by piece and the
safetensors writer puts each piece straight at its place in the output file (the header is written
first, from the shapes), so the peak is one piece (a DCP group of at most 256 MiB, one tensor of a
full file, one rank's fp32 partition under ZeRO), never the optimizer state nor a second copy of the
model. `--format pt` needs `torch.save`, which holds the whole output once in memory.

Tied weights (lm_head.weight = wte.weight) are stored once; `weights.complete_tied` restores them
on load. `--max-shard-size` writes HF-style shards plus `model.safetensors.index.json`.
Outputs are written under a temporary name and renamed when complete; an existing output is kept
unless `--force`.

`--format hf` writes a folder a Hugging Face loader opens: `model.safetensors` (or shards and the
index past `--max-shard-size`) and `config.json`, which `hf_export` derives from the model the tag's
meta.json describes (rebuilt on the meta device) before any output is touched.

Default output: `<run>/consolidated/<tag>.safetensors` (`.pt` for `--format pt`), or the folder
`<run>/consolidated/<tag>/` with `--max-shard-size`, or `<run>/consolidated/<tag>-hf/` with
`--format hf`, where `<run>` is the folder holding CKPT_DIR.

Imports: torch, `scaletrain.checkpoint.layout`, `scaletrain.checkpoint.readers`,
`scaletrain.checkpoint.hf_export` (for `--format hf`), `scaletrain.errors`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint import layout, readers
from scaletrain.errors import CheckpointError

log = logging.getLogger(__name__)

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
PARTIAL = ".partial"


def parse_size(text: str) -> int:
    """`500MB`, `2GB` (powers of 10, as Hugging Face counts), `1GiB` (powers of 2), or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise CheckpointError(f"--max-shard-size {text!r}: use a size like 500MB, 2GB or 1GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise CheckpointError(f"--max-shard-size {text!r} must be positive")
    return size


class _SafetensorsFile:
    """A safetensors file written out of order: header first (from shapes), then pieces by pwrite."""

    def __init__(self, path: Path, entries: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": meta}
        pos = 0
        for name, (shape, dtype) in entries.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data area starts 8-byte aligned
        self.path, self.entries = path, entries
        self.base = {n: 8 + len(raw) + header[n]["data_offsets"][0] for n in entries}
        self.written = dict.fromkeys(entries, 0)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, 8 + len(raw) + pos)

    def write(self, name: str, first: int, piece: torch.Tensor) -> None:
        dtype = self.entries[name][1]
        data = piece.detach().to(dtype).contiguous().reshape(-1)
        buf = data.view(torch.uint8).numpy() if data.numel() else b""
        os.pwrite(self.fd, memoryview(buf), self.base[name] + first * dtype.itemsize)
        self.written[name] += data.numel()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        short = [n for n, (shape, _) in self.entries.items() if self.written[n] != math.prod(shape)]
        if short:
            raise CheckpointError(f"{self.path}: the checkpoint did not supply all of {short[:3]}; it is incomplete")


class _PtFile:
    """`--format pt`: the tensors are assembled in memory and written with torch.save."""

    def __init__(self, path: Path, entries: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: dict[str, str]):
        self.path = path
        self.tensors = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in entries.items()}

    def write(self, name: str, first: int, piece: torch.Tensor) -> None:
        flat = self.tensors[name].view(-1)
        flat[first:first + piece.numel()] = piece.to(flat.dtype)

    def close(self) -> None:
        torch.save(self.tensors, self.path)
        self.tensors = {}


def _shard_plan(entries: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int | None) -> list[list[str]]:
    if max_bytes is None:
        return [list(entries)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in entries.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _resolve_tag(ckpt_dir: Path, tag: str | None) -> Path:
    if (ckpt_dir / layout.META_FILE).is_file() or (tag is None and readers_detectable(ckpt_dir)):
        return ckpt_dir  # CKPT_DIR is a tag folder itself
    return layout.resolve_tag(ckpt_dir, tag)


def readers_detectable(path: Path) -> bool:
    try:
        layout.detect_format(path)
    except CheckpointError:
        return False
    return True


def default_out(tag_dir: Path, fmt: str, sharded: bool) -> Path:
    base = tag_dir.parent.parent / "consolidated"
    if fmt == "hf":
        return base / f"{tag_dir.name}-hf"
    return base / tag_dir.name if sharded else base / f"{tag_dir.name}.{'safetensors' if fmt == 'safetensors' else 'pt'}"


def _check_tag(tag_dir: Path, verify: bool) -> None:
    if not (tag_dir / layout.META_FILE).is_file():
        log.warning("%s has no %s: consolidating without an integrity check", tag_dir, layout.META_FILE)
        return
    info = layout.check_tag(tag_dir)
    if info.intact and verify:
        info = layout.check_tag(tag_dir, digests=layout.digest_files(tag_dir, sorted(info.meta["files"])))
    if not info.intact:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged ({'; '.join(info.problems)}); pick another with --tag")


def consolidate(ckpt_dir: Path, *, tag: str | None = None, out: Path | None = None, dtype: str = "fp32",
                fmt: str = "safetensors", max_shard_size: int | None = None, force: bool = False,
                verify: bool = False) -> list[Path]:
    """Write the weights of one tag; returns the files written (the index, then config.json, last)."""
    tag_dir = _resolve_tag(Path(ckpt_dir), tag)
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint tag {tag_dir} does not exist")
    _check_tag(tag_dir, verify)
    reader = readers.open_reader(tag_dir)
    out_dtype = _OUT_DTYPES[dtype]
    entries = {n: (shape, out_dtype if d.is_floating_point else d) for n, (shape, d) in reader.entries.items()}
    config_text = None
    if fmt == "hf":  # everything that can fail about the model is checked before the output is touched
        from scaletrain.checkpoint import hf_export

        config_text = hf_export.config_json(tag_dir, layout.read_meta(tag_dir), reader, out_dtype)
    out = Path(out) if out is not None else default_out(tag_dir, fmt, max_shard_size is not None)
    shards = _shard_plan(entries, max_shard_size)
    ext = "pt" if fmt == "pt" else "safetensors"
    # An HF folder holds one model.safetensors unless the shard size splits it (as save_pretrained does).
    sharded = len(shards) > 1 if fmt == "hf" else max_shard_size is not None
    if sharded:
        targets = [out / f"model-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    else:
        targets = [out / "model.safetensors" if fmt == "hf" else out]
    index = out / f"model.{ext}.index.json" if sharded else None
    config = out / "config.json" if config_text is not None else None
    extra = [p for p in (index, config) if p is not None]
    _prepare_out(out, targets + extra, force=force, is_dir=fmt == "hf" or index is not None, tag_dir=tag_dir)
    meta = {"format": "pt", "source": f"{tag_dir.name} ({reader.format})",
            "tied": json.dumps(reader.aliases, sort_keys=True)}
    cls = _PtFile if fmt == "pt" else _SafetensorsFile
    files = {}
    for names, target in zip(shards, targets):
        f = cls(target.with_name(target.name + PARTIAL), {n: entries[n] for n in names}, meta)
        files.update(dict.fromkeys(names, f))
    try:
        reader.fill(lambda name, first, piece: files[name].write(name, first, piece))
        for f in dict.fromkeys(files.values()):
            f.close()
    except BaseException:
        for target in targets:
            target.with_name(target.name + PARTIAL).unlink(missing_ok=True)
        raise
    for target in targets:
        os.replace(target.with_name(target.name + PARTIAL), target)
    if index is not None:
        total = sum(math.prod(s) * d.itemsize for s, d in entries.values())
        weight_map = {n: targets[i].name for i, names in enumerate(shards) for n in names}
        layout.write_atomic(index, json.dumps({"metadata": {"total_size": total, **meta}, "weight_map": weight_map},
                                              indent=2) + "\n")
    if config is not None and config_text is not None:
        layout.write_atomic(config, config_text)  # last: a folder with config.json is complete
    return targets + extra


# What consolidate (and an HF-style export) writes into an output folder; nothing else is ever touched.
OWN_FILES = re.compile(r"^(model(-\d{5}-of-\d{5})?\.(safetensors|pt)(\.index\.json)?|config\.json|generation_config\.json)$")


def _prepare_out(out: Path, paths: list[Path], *, force: bool, is_dir: bool, tag_dir: Path) -> None:
    """Refuse an output that would overwrite what this command did not write: never the checkpoint's
    own folder (or one containing it); with --force only files named like consolidate's outputs are
    replaced, and a folder holding anything else is refused."""
    resolved, tag = out.resolve(), tag_dir.resolve()
    if resolved == tag or tag.is_relative_to(resolved) or resolved.is_relative_to(tag):
        raise CheckpointError(f"consolidate: --out {out} overlaps the checkpoint {tag_dir}; choose a folder outside it")
    if is_dir:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"consolidate: --out {out} is a file; give a folder for sharded output")
        present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        foreign = [n for n in present if not OWN_FILES.match(n)]
        if foreign:
            raise CheckpointError(f"consolidate: {out} holds files consolidate did not write ({', '.join(foreign[:3])}"
                                  f"{', ...' if len(foreign) > 3 else ''}); choose an empty --out folder")
        if present and not force:
            raise CheckpointError(f"consolidate: {out / present[0]} exists; pass --force to replace it or choose --out")
        for name in present:  # stale shards of an earlier consolidation; only names matching OWN_FILES
            (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        return
    if out.is_dir():
        raise CheckpointError(f"consolidate: --out {out} is a folder; give a file name (or use --max-shard-size)")
    if out.exists() and not force:
        raise CheckpointError(f"consolidate: {out} exists; pass --force to replace it or choose --out")
    out.parent.mkdir(parents=True, exist_ok=True)
