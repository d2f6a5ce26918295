"""The checkpoint folder's rules without a process group: names, integrity, commit, rotation, and the
streaming weights writer of `consolidate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scaletrain.checkpoint import consolidate, layout
from scaletrain.errors import CheckpointError
from scaletrain.model.weights import canonical_name, complete_tied, load_weights_file


def make_tag(ckpt: Path, step: int, *, val_loss: float | None = None, payload: bytes = b"x" * 100) -> Path:
    """A committed tag the way the manager writes one: files, meta.json with sizes and sha256, rename."""
    tag = layout.tag_name(step)
    tmp = layout.tmp_dir_for(ckpt, tag)
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "dcp" / "__0_0.distcp").write_bytes(payload)
    (tmp / "client_state.pt").write_bytes(b"state" + bytes([step % 256]))
    files = layout.digest_files(tmp, layout.list_files(tmp))
    layout.write_meta(tmp, {"step": step, "val_loss": val_loss}, files)
    layout.commit(tmp, ckpt / tag)
    layout.write_atomic(ckpt / layout.LATEST_FILE, tag + "\n")
    return ckpt / tag


def digests(tag_dir: Path) -> dict[str, dict]:
    return layout.digest_files(tag_dir, layout.list_files(tag_dir))


def test_tag_names_round_trip():
    assert layout.tag_name(42) == "step_00000042" and layout.tag_step("step_00000042") == 42
    assert layout.tag_step("step_42") is None and layout.tag_step(".tmp-step_00000042") is None


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "/etc", "a/b", "a\\b", "x\x00"])
def test_safe_child_refuses_names_that_leave_the_folder(tmp_path: Path, name: str):
    with pytest.raises(CheckpointError):
        layout.safe_child(tmp_path, name)


def test_safe_child_refuses_a_symlinked_tag_pointing_outside(tmp_path: Path):
    ckpt, outside = tmp_path / "ckpt", tmp_path / "elsewhere"
    ckpt.mkdir()
    outside.mkdir()
    (ckpt / "step_00000009").symlink_to(outside)
    with pytest.raises(CheckpointError, match="escapes"):
        layout.safe_child(ckpt, "step_00000009")
    assert layout.tags(ckpt) == []  # never listed as a tag either


def test_manifest_names_cannot_escape(tmp_path: Path):
    tag = make_tag(tmp_path, 1)
    meta = json.loads((tag / layout.META_FILE).read_text())
    meta["files"]["../../outside"] = {"size": 1, "sha256": "0" * 64}
    (tag / layout.META_FILE).write_text(json.dumps(meta))
    info = layout.check_tag(tag)
    assert not info.intact and any("not a plain relative path" in p for p in info.problems)


def test_check_tag_finds_truncation_and_flipped_bytes(tmp_path: Path):
    tag = make_tag(tmp_path, 1)
    assert layout.check_tag(tag, digests=digests(tag)).intact
    shard = tag / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert layout.check_tag(tag).intact  # same size: only the checksum sees it
    assert layout.check_tag(tag, digests=digests(tag)).problems == ("dcp/__0_0.distcp: checksum mismatch",)
    shard.write_bytes(bytes(data[:50]))
    assert "dcp/__0_0.distcp: 50 bytes, expected 100" in layout.check_tag(tag).problems
    (tag / layout.META_FILE).unlink()
    assert not layout.check_tag(tag).intact


def test_commit_replaces_a_tag_and_clean_tmp_keeps_complete_tags(tmp_path: Path):
    make_tag(tmp_path, 1, payload=b"a" * 10)
    make_tag(tmp_path, 1, payload=b"b" * 20)  # a re-save of the same step replaces it whole
    assert (tmp_path / "step_00000001" / "dcp" / "__0_0.distcp").read_bytes() == b"b" * 20
    (tmp_path / ".tmp-step_00000002").mkdir()
    (tmp_path / ".tmp-step_00000003").write_text("not a folder")
    layout.clean_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_rotation_keeps_the_newest_and_the_protected(tmp_path: Path):
    for step in range(1, 7):
        make_tag(tmp_path, step)
    removed = layout.rotate(tmp_path, 2, protect={"step_00000002"})
    assert removed == ["step_00000001", "step_00000003", "step_00000004"]
    assert [p.name for p in layout.tags(tmp_path)] == ["step_00000002", "step_00000005", "step_00000006"]


def test_rotation_ignores_tags_past_the_committed_step(tmp_path: Path):
    """After a fallback resume from step 2, stale tags 5 and 6 must not push the new step 3 out."""
    for step in (1, 2, 5, 6):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 3)
    assert layout.rotate(tmp_path, 2, protect=set(), upto_step=3) == ["step_00000001"]
    assert (tmp_path / "step_00000003").is_dir()


def test_canonical_names_and_tied_completion():
    assert canonical_name("module._orig_mod.blocks.0._checkpoint_wrapped_module.attn.w") == "blocks.0.attn.w"
    assert canonical_name("_fsdp_wrapped_module.wte.weight") == "wte.weight"
    model = torch.nn.Module()
    model.a = torch.nn.Linear(2, 2, bias=False)
    model.b = torch.nn.Linear(2, 2, bias=False)
    model.b.weight = model.a.weight
    full = complete_tied(model, {"a.weight": torch.ones(2, 2)})
    model.load_state_dict(full, strict=True)


@pytest.mark.parametrize("text,size", [("500MB", 500 * 10**6), ("1GiB", 2**30), ("2kb", 2000), ("123", 123)])
def test_parse_size(text: str, size: int):
    assert consolidate.parse_size(text) == size


def test_parse_size_refuses_nonsense():
    with pytest.raises(CheckpointError, match="--max-shard-size"):
        consolidate.parse_size("12 parsecs")


def test_streaming_safetensors_writer_out_of_order_pieces(tmp_path: Path):
    """Pieces written in any order land where they belong; safetensors reads the result."""
    from safetensors.torch import load_file

    a, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.arange(5, dtype=torch.int64)
    entries = {"a": ((3, 4), torch.bfloat16), "b": ((5,), torch.int64)}
    f = consolidate._SafetensorsFile(tmp_path / "w.safetensors", entries, {"format": "pt"})
    f.write("a", 6, a.reshape(-1)[6:])
    f.write("b", 0, b)
    f.write("a", 0, a.reshape(-1)[:6])
    f.close()
    got = load_file(tmp_path / "w.safetensors")
    assert torch.equal(got["a"], a.bfloat16()) and torch.equal(got["b"], b)
    g = consolidate._SafetensorsFile(tmp_path / "short.safetensors", entries, {})
    g.write("b", 0, b)
    with pytest.raises(CheckpointError, match="did not supply"):
        g.close()


def test_shard_plan_and_index_loading(tmp_path: Path):
    from safetensors.torch import save_file

    entries = {n: ((10,), torch.float32) for n in "abcde"}  # 40 bytes each
    shards = consolidate._shard_plan(entries, 100)
    assert shards == [["a", "b"], ["c", "d"], ["e"]]
    weight_map = {}
    for i, names in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: torch.full((10,), float(ord(n))) for n in names}, tmp_path / name)
        weight_map.update(dict.fromkeys(names, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_weights_file(tmp_path / "model.safetensors.index.json")
    assert sorted(loaded) == list("abcde") and float(loaded["e"][0]) == ord("e")


# ---------------------------------------------------------------------------------------------
# The manager's rules with one process (its collectives are no-ops without a process group).


class FakeEngine:
    """Writes one file per save; `fail_with` makes the next save raise like a full or read-only disk."""

    supports_async_save = False

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None
        self.loaded: Path | None = None

    def save_checkpoint(self, path: Path, client_state: dict, *, async_save: bool = False) -> None:
        (path / "engine.bin").write_bytes(b"partial")
        if self.fail_with is not None:
            raise self.fail_with
        (path / "client.json").write_text(json.dumps(client_state))

    def wait_for_save(self) -> None:
        pass

    def load_checkpoint(self, path: Path, meta: dict) -> dict:
        self.loaded = path
        return json.loads((path / "client.json").read_text())


def manager(ckpt: Path, **cfg):
    import torch as _torch

    from scaletrain.checkpoint.manager import CheckpointManager
    from scaletrain.config import CheckpointConfig
    from scaletrain.dist import DistContext

    ctx = DistContext(0, 0, 1, _torch.device("cpu"), "single")
    return CheckpointManager(ckpt, CheckpointConfig(**cfg), ctx)


def test_best_tag_survives_rotation_and_pointer_follows_the_lowest_val_loss(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    m, engine = manager(ckpt, keep_last=2), FakeEngine()
    for step, val in zip(range(1, 7), [3.0, 1.0, 2.0, None, 2.5, 1.5]):
        assert m.save(engine, step, {"step": step}, {"val_loss": val})
    assert [p.name for p in layout.tags(ckpt)] == ["step_00000002", "step_00000005", "step_00000006"]
    assert layout.read_pointer(ckpt, layout.BEST_FILE) == "step_00000002"
    assert layout.read_pointer(ckpt) == "step_00000006"
    assert manager(ckpt, keep_last=2).best == (1.0, "step_00000002")  # remembered across restarts
    m.save(engine, 7, {"step": 7}, {"val_loss": 0.5})  # a new best: the old one joins rotation
    assert [p.name for p in layout.tags(ckpt)] == ["step_00000006", "step_00000007"]
    assert layout.read_pointer(ckpt, layout.BEST_FILE) == "step_00000007"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("file write failed")])
def test_failed_save_keeps_earlier_tags_and_removes_its_own_files(tmp_path: Path, error: BaseException):
    ckpt = tmp_path / "ckpt"
    m, engine = manager(ckpt), FakeEngine()
    m.save(engine, 1, {"step": 1}, {})
    engine.fail_with = error
    with pytest.raises(CheckpointError, match=r"checkpoint save failed .* earlier checkpoints are intact"):
        m.save(engine, 2, {"step": 2}, {})
    assert sorted(p.name for p in ckpt.iterdir()) == [".run_id", "latest", "step_00000001"]  # no .tmp- left
    warn = manager(ckpt, on_error="warn")
    assert warn.save(engine, 2, {"step": 2}, {}) is False
    assert layout.read_pointer(ckpt) == "step_00000001"


def test_failed_mkdir_of_the_tmp_folder_is_a_clean_failure(tmp_path: Path):
    """As root nothing is read-only; a file where the temporary folder goes makes mkdir fail the same way."""
    ckpt = tmp_path / "ckpt"
    m, engine = manager(ckpt), FakeEngine()
    m.save(engine, 1, {"step": 1}, {})
    (ckpt / ".tmp-step_00000002").write_text("in the way")
    with pytest.raises(CheckpointError, match="cannot create"):
        m.save(engine, 2, {"step": 2}, {})
    assert layout.check_tag(ckpt / "step_00000001").intact


def test_resume_falls_back_past_a_damaged_latest_and_refuses_escapes(tmp_path: Path, caplog):
    ckpt = tmp_path / "ckpt"
    m, engine = manager(ckpt), FakeEngine()
    for step in (1, 2):
        m.save(engine, step, {"step": step}, {})
    (ckpt / "step_00000002" / "client.json").write_text('{"step": 9}')  # same size, other bytes
    with caplog.at_level("WARNING"):
        assert m.resume(engine) == {"step": 1}
    assert "latest names step_00000002, which is damaged or incomplete; resuming from step_00000001" in caplog.text
    (ckpt / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a plain name"):
        m.resume(engine)


# ---------------------------------------------------------------------------------------------
# Review items: damage that must not pass, structure that must not crash, deletes that must not lose.


def test_item6_an_unreadable_or_undigested_file_is_damage(tmp_path: Path):
    tag = make_tag(tmp_path, 1)
    names = layout.list_files(tag)
    good = layout.digest_files(tag, names)
    assert layout.check_tag(tag, digests=good).intact
    missing_one = dict(list(good.items())[1:])  # a rank's share that never arrived
    info = layout.check_tag(tag, digests=missing_one)
    assert not info.intact and any("no checksum computed" in p for p in info.problems)
    (tag / names[0]).chmod(0o000)
    try:
        import os

        if os.geteuid() == 0:  # root reads anything: simulate the read error the way digest_files reports it
            unreadable = {**good, names[0]: {"error": "Permission denied"}}
        else:
            unreadable = layout.digest_files(tag, names)
        info = layout.check_tag(tag, digests=unreadable)
        assert not info.intact and any("unreadable" in p for p in info.problems)
    finally:
        (tag / names[0]).chmod(0o644)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: m.update(files=[]), "'files' is not a mapping"),
        (lambda m: m.update(step="7"), "'step' is not a non-negative integer"),
        (lambda m: m["files"].update({"x": {"size": "1"}}), "lacks an integer size and a sha256"),
        (lambda m: m.update(format_version=99), "format_version 99 is newer than this scaletrain reads"),
    ],
)
def test_item16_malformed_meta_is_one_problem_not_a_traceback(tmp_path: Path, mutate, needle: str):
    tag = make_tag(tmp_path, 1)
    meta = json.loads((tag / layout.META_FILE).read_text())
    mutate(meta)
    (tag / layout.META_FILE).write_text(json.dumps(meta))
    info = layout.check_tag(tag)
    assert not info.intact and any(needle in p for p in info.problems), info.problems
    assert layout.read_meta(tag) is None


def test_item16_inspect_and_consolidate_report_malformed_meta_in_one_line(tmp_path: Path, capsys):
    from scaletrain import cli

    tag = make_tag(tmp_path, 1)
    meta = json.loads((tag / layout.META_FILE).read_text())
    meta["files"] = []
    (tag / layout.META_FILE).write_text(json.dumps(meta))
    assert cli.main(["inspect", str(tmp_path), "--verify"]) == 1
    assert "'files' is not a mapping" in capsys.readouterr().out
    assert cli.main(["consolidate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err and "'files' is not a mapping" in err


def test_item18_rotation_renames_before_deleting_and_leftovers_are_collected(tmp_path: Path, monkeypatch):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)
    real_remove = layout._remove
    calls = []

    def interrupted(p: Path) -> None:  # the process dies before the delete
        calls.append(p.name)
        if p.name.startswith(layout.TRASH_PREFIX) and p.exists():
            raise KeyboardInterrupt

    monkeypatch.setattr(layout, "_remove", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layout.rotate(tmp_path, keep_last=1, protect=set())
    monkeypatch.setattr(layout, "_remove", real_remove)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert f"{layout.TRASH_PREFIX}step_00000001" in names and "step_00000001" not in names  # no meta-less step_
    layout.clean_tmp(tmp_path)
    assert [p.name for p in layout.tags(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not any(p.name.startswith(layout.TRASH_PREFIX) for p in tmp_path.iterdir())


def test_item18_resaving_a_step_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path: Path, monkeypatch):
    import os

    old = make_tag(tmp_path, 5, payload=b"old" * 10)
    tmp = layout.tmp_dir_for(tmp_path, old.name)
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "dcp" / "__0_0.distcp").write_bytes(b"new" * 10)
    layout.write_meta(tmp, {"step": 5}, layout.digest_files(tmp, layout.list_files(tmp)))
    real_replace = os.replace

    def crash_on_second(src, dst):  # dies between the two renames
        if Path(src) == tmp:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        layout.commit(tmp, old)
    monkeypatch.setattr(layout.os, "replace", real_replace)
    assert not old.exists()
    layout.clean_tmp(tmp_path)  # the next start puts the old, complete copy back
    assert layout.check_tag(old, digests=digests(old)).intact
    assert (old / "dcp" / "__0_0.distcp").read_bytes() == b"old" * 10


# ---------------------------------------------------------------------------------------------
# The durable writes under the layout (`scaletrain.io`): one implementation for every caller


def test_write_atomic_replaces_whole_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    import os

    from scaletrain import io

    target = tmp_path / "latest"
    io.write_atomic(target, "step_00000001\n")
    io.write_atomic(target, b"step_00000002\n")  # bytes as they are
    assert target.read_text() == "step_00000002\n"
    synced = []
    monkeypatch.setattr(io, "fsync_dir", lambda p: synced.append(Path(p)))
    io.write_atomic(target, "step_00000003\n")
    assert synced == [tmp_path]  # the rename itself is made durable

    def no_rename(src, dst):  # a full disk or a crash between write and rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        io.write_atomic(target, "step_00000004\n")
    monkeypatch.setattr(io.os, "replace", os.replace)
    assert target.read_text() == "step_00000003\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # the temporary sibling is gone
    assert layout.write_atomic is io.write_atomic and layout.fsync_tree is io.fsync_tree


def test_fsync_tree_syncs_every_file_and_the_folders_that_hold_them(tmp_path: Path, monkeypatch):
    import os

    from scaletrain import io

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / "a.distcp").write_bytes(b"a")
    (tmp_path / "client_state.pt").write_bytes(b"b")
    files, folders = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (files.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                    real_fsync(fd)))
    monkeypatch.setattr(io, "fsync_dir", lambda p: folders.append(Path(p)))
    io.fsync_tree(tmp_path)
    assert sorted(Path(f).relative_to(tmp_path).as_posix() for f in files) == ["client_state.pt", "dcp/a.distcp"]
    assert folders == [tmp_path / "dcp", tmp_path]  # deepest first
    files.clear()
    io.fsync_tree(tmp_path, ["dcp/a.distcp"])  # only the named ones
    assert [Path(f).name for f in files] == ["a.distcp"]
