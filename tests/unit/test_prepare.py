"""`scaletrain prepare` with HF tokenizers and table inputs, and nanoGPT folders in `read_meta`."""

from __future__ import annotations

import builtins
import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from scaletrain.cli import main
from scaletrain.data import documents, tokenizer
from scaletrain.data import prepare as prep
from scaletrain.data.format import read_meta
from scaletrain.errors import DataError

tokenizers = pytest.importorskip("tokenizers")

DOCS = [
    "def f(x):\n    return x + 1\n\nprint(f(2))\n" * 30,
    "Grüße aus Köln — naïve café, 東京, emoji 🙂.\n" * 20,
    "short one",
    "\n\n  leading and trailing space  \n\n",
]


def _write_docs(folder: Path, docs: list[str] = DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    return folder


def _ids(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])


def _decode(out: Path) -> str:
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    return tok.decode(_ids(out).tolist(), skip_special_tokens=False)


def test_trained_bpe_round_trips_through_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    # Small pieces and chunks: files are cut into pieces and the stream spans many encode_batch calls.
    monkeypatch.setattr(documents, "PIECE_BYTES", 64)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 200)
    src = _write_docs(tmp_path / "src")
    out = tmp_path / "d"
    assert main(["prepare", str(src), "--out", str(out), "--train-tokenizer", "320"]) == 0
    assert "prepared" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["vocab_size"] == 320 and meta["documents"] == len(DOCS) and meta["source_files"] == len(DOCS)
    ids = _ids(out)
    assert meta["max_token_id"] == int(ids.max()) < 320
    assert len(ids) < sum(len(d.encode()) for d in DOCS) * 0.8  # the merges compress
    assert _decode(out).split("<|endoftext|>") == DOCS
    m = read_meta(out)
    assert m.tokenizer == out / "tokenizer.json" and m.train_tokens + m.val_tokens == len(ids)
    assert m.val_tokens == max(int(len(ids) * prep.VAL_FRACTION), 1)  # the last 5% of the stream


def test_given_tokenizer_file_and_folder(tmp_path: Path) -> None:
    src = _write_docs(tmp_path / "src")
    tok = tokenizer.train_tokenizer(DOCS, 300)
    tok.save(str(tmp_path / "tok.json"))
    prep.prepare([src], tmp_path / "a", tokenizer=tmp_path / "tok.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    expect = []
    for i, d in enumerate(DOCS):
        expect += ([0] if i else []) + tok.encode(d, add_special_tokens=False).ids
    assert _ids(tmp_path / "a").tolist() == expect

    # A model folder whose tokenizer has no end-of-text token: documents are joined with a newline.
    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = tokenizers.decoders.ByteLevel()
    bare.train_from_iterator(DOCS, tokenizers.trainers.BpeTrainer(
        vocab_size=280, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    model = tmp_path / "model"
    model.mkdir()
    bare.save(str(model / "tokenizer.json"))
    meta = prep.prepare([src], tmp_path / "b", tokenizer=model)
    assert meta["eos_id"] is None
    assert _decode(tmp_path / "b") == "\n".join(DOCS)


def _word_tokenizer(tmp_path: Path, vocab: int) -> Path:
    words = {f"w{i}": i for i in range(vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    f = tmp_path / f"words{vocab}.json"
    tok.save(str(f))
    return f


@pytest.mark.parametrize(("vocab", "dtype"), [(65536, "uint16"), (65537, "uint32")])
def test_dtype_follows_vocab_size(tmp_path: Path, vocab: int, dtype: str) -> None:
    src = tmp_path / "in.txt"
    top = vocab - 1
    src.write_text(f"w{top} w1 w2 " * 50)
    meta = prep.prepare([src], tmp_path / "d", tokenizer=_word_tokenizer(tmp_path, vocab))
    assert meta["dtype"] == dtype and meta["vocab_size"] == vocab and meta["max_token_id"] == top
    assert _ids(tmp_path / "d")[:3].tolist() == [top, 1, 2]
    assert read_meta(tmp_path / "d").dtype == dtype


TEXTS = ["first row text", "second, with a comma", "third\nwith a newline", "fourth"]


def _table(tmp_path: Path, kind: str) -> Path:
    rows = [{"id": i, "body": t} for i, t in enumerate(TEXTS)]
    f = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "body"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), f)
    return f


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_table_inputs_with_text_field(tmp_path: Path, kind: str) -> None:
    f = _table(tmp_path, kind)
    meta = prep.prepare([f], tmp_path / "d", text_field="body")
    assert bytes(_ids(tmp_path / "d").astype(np.uint8)).decode() == "\n".join(TEXTS)
    assert meta["tokenizer"] == "bytes" and meta["source_files"] == 1
    tok = tokenizer.train_tokenizer(TEXTS * 20, 300)
    tok.save(str(tmp_path / "tok.json"))
    prep.prepare([f], tmp_path / "t", text_field="body", tokenizer=tmp_path / "tok.json")
    assert _decode(tmp_path / "t").split("<|endoftext|>") == TEXTS


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: prepare")
    return err[-1]


def test_table_input_errors(tmp_path: Path, capsys) -> None:
    f = _table(tmp_path, "jsonl")
    msg = _cli_error(capsys, ["prepare", str(f), "--out", str(tmp_path / "a")])
    assert str(f) in msg and "--text-field NAME" in msg
    msg = _cli_error(capsys, ["prepare", str(f), "--out", str(tmp_path / "b"), "--text-field", "text"])
    assert "--text-field" in msg and "'text'" in msg and "id, body" in msg
    msg = _cli_error(capsys, ["prepare", str(f), "--out", str(tmp_path / "c"), "--text-field", "id"])
    assert "int, not text" in msg
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    msg = _cli_error(capsys, ["prepare", str(bad), "--out", str(tmp_path / "d"), "--text-field", "body"])
    assert str(bad) in msg and "cannot read" in msg
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing half-written


def test_tokenizer_errors(tmp_path: Path, capsys) -> None:
    src = _write_docs(tmp_path / "src")
    junk = tmp_path / "tokenizer.json"
    junk.write_text('{"not": "a tokenizer"}')
    msg = _cli_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "a"), "--tokenizer", str(junk)])
    assert str(junk) in msg and "--tokenizer" in msg and "not a tokenizers tokenizer.json" in msg
    empty = tmp_path / "empty_model"
    empty.mkdir()
    msg = _cli_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "a"), "--tokenizer", str(empty)])
    assert "has no tokenizer.json" in msg
    msg = _cli_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "a"), "--train-tokenizer", "100"])
    assert "--train-tokenizer" in msg and "257" in msg
    assert not (tmp_path / "a").exists()


def test_non_empty_out_needs_force(tmp_path: Path, capsys) -> None:
    src = _write_docs(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    msg = _cli_error(capsys, ["prepare", str(src), "--out", str(out), "--train-tokenizer", "300"])
    assert "not empty" in msg and "--force" in msg and (out / "keep").exists()
    assert main(["prepare", str(src), "--out", str(out), "--train-tokenizer", "300", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _nanogpt(tmp_path: Path) -> Path:
    d = tmp_path / "shakespeare_char"
    d.mkdir()
    (np.arange(1000) % 65).astype(np.uint16).tofile(d / "train.bin")
    (np.arange(100) % 65).astype(np.uint16).tofile(d / "val.bin")
    # A pickle that fails when loaded (it names a module that does not exist): it must never be read.
    (d / "meta.pkl").write_bytes(b"cno_such_module_for_scaletrain\nboom\n(tR.")
    return d


def test_nanogpt_folder_needs_vocab_size_and_never_opens_meta_pkl(tmp_path: Path, monkeypatch) -> None:
    d = _nanogpt(tmp_path)
    with pytest.raises(ModuleNotFoundError):  # the fixture really fails when unpickled
        pickle.loads((d / "meta.pkl").read_bytes())

    real_open, real_io_open = builtins.open, io.open

    def guarded(opener):
        def _open(file, *a, **k):
            if str(file).endswith("meta.pkl"):
                raise AssertionError("meta.pkl was opened")
            return opener(file, *a, **k)
        return _open

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(io, "open", guarded(real_io_open))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))

    with pytest.raises(DataError, match=r"no meta\.json \(a nanoGPT folder\?\).*meta\.pkl is ignored.*data\.vocab_size=N") as e:
        read_meta(d)
    assert "\n" not in str(e.value)
    m = read_meta(d, vocab_size=65)
    assert (m.vocab_size, m.dtype, m.train_tokens, m.val_tokens, m.tokenizer) == (65, "uint16", 1000, 100, None)
    with pytest.raises(DataError, match=r"data\.vocab_size"):
        read_meta(d, vocab_size=70000)  # uint16 ids cannot index that


def test_vocab_size_must_match_meta_json(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("plain bytes " * 100)
    prep.prepare([src], tmp_path / "d")
    assert read_meta(tmp_path / "d", vocab_size=256).vocab_size == 256
    with pytest.raises(DataError, match=r"data\.vocab_size: 512 differs from vocab_size 256"):
        read_meta(tmp_path / "d", vocab_size=512)


def test_cut_keeps_pieces_on_word_and_character_boundaries() -> None:
    assert documents._cut(b"abc\n  def\nghi\n") == 10  # after the newline between two words
    assert documents._cut(b"abc \ndef\n") == 5  # no newline between words: fall back to the last one
    assert documents._cut(b"abc\n\n\n") == 6 - 1  # only whitespace follows: the last newline with a byte after it
    text = "é" * 10
    cut = documents._cut(text.encode())
    assert text.encode()[:cut].decode() and cut % 2 == 0


def test_pieces_encode_like_the_whole_file(tmp_path: Path, monkeypatch) -> None:
    """Cutting a file into pieces leaves a byte-level BPE's ids unchanged (whitespace runs included)."""
    monkeypatch.setattr(documents, "PIECE_BYTES", 48)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 100)
    text = "".join(f"line {i} \n\n  indented{i}\nx = {i} \t\n" for i in range(60))
    (tmp_path / "in.txt").write_text(text)
    # Documents that end in whitespace + newline teach merges across it, which a careless cut would use.
    tok = tokenizer.train_tokenizer([text] + ["end  \t\n", "x \n", "y\t \n"] * 100, 320)
    tok.save(str(tmp_path / "tok.json"))
    prep.prepare([tmp_path / "in.txt"], tmp_path / "d", tokenizer=tmp_path / "tok.json")
    assert _ids(tmp_path / "d").tolist() == tok.encode(text, add_special_tokens=False).ids
