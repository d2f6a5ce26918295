"""Tokenizers for `prepare`: a HuggingFace `tokenizers` tokenizer.json (or a model folder holding one),
a byte-level BPE trained on the input, its end-of-text id, and encoding a chunk of documents (or raw
bytes, vocab 256) into token ids joined by a separator.
Imports: numpy; tokenizers only when asked for; `scaletrain.data.format`, `scaletrain.errors`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from scaletrain.data.format import INSTALL_HINT, TOKENIZER_FILE
from scaletrain.errors import DataError

EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
TRAINED_EOS = "<|endoftext|>"


def require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"prepare --tokenizer/--train-tokenizer: the `tokenizers` package is missing; {INSTALL_HINT}") from None
    return tokenizers


def load_tokenizer(path: Path) -> tuple[Any, Path, int | None]:
    """(tokenizer, its tokenizer.json, eos id or None) from a tokenizer.json or a folder holding one."""
    tokenizers = require_tokenizers()
    path = Path(path)
    folder = path if path.is_dir() else None
    file = path / TOKENIZER_FILE if folder else path
    if not path.exists():
        raise DataError(f"prepare --tokenizer: {path} does not exist; pass a tokenizer.json file or a model folder holding one")
    if folder is not None and not file.is_file():
        raise DataError(
            f"prepare --tokenizer: {folder} has no {TOKENIZER_FILE}; pass a folder with a fast (tokenizers) "
            "tokenizer, or save one there with transformers' AutoTokenizer.save_pretrained"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise DataError(
            f"prepare --tokenizer: {file} is not a tokenizers tokenizer.json ({msg}); "
            "pass the tokenizer.json of a fast HuggingFace tokenizer"
        ) from None
    names = list(EOS_NAMES)
    config = (folder or file.parent) / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            names.insert(0, eos)
    return tok, file, eos_id(tok, names)


def eos_id(tok: Any, names: list[str]) -> int | None:
    """The first of `names` that is one of the tokenizer's added (special) tokens."""
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    for name in names:
        if name in added:
            return int(added[name])
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style pre-tokenisation, `<|endoftext|>` as id 0) trained on `texts`."""
    tokenizers = require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[TRAINED_EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def vocab_size_of(tok: Any) -> int:
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def encode_chunk(tok: Any, chunk: list[tuple[bool, bytes]], sep: np.ndarray, first: bool, dtype: np.dtype) -> np.ndarray:
    """Token ids of one chunk, with `sep` before every document but the stream's first."""
    texts = [data.decode("utf-8", errors="replace") for _, data in chunk]
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    parts = []
    for i, ((new_doc, _), enc) in enumerate(zip(chunk, encodings)):
        if new_doc and not (first and i == 0):
            parts.append(sep)
        parts.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def encode_bytes(chunk: list[tuple[bool, bytes]], first: bool) -> np.ndarray:
    joined = b"".join(
        (b"\n" + data) if new_doc and not (first and i == 0) else data for i, (new_doc, data) in enumerate(chunk)
    )
    return np.frombuffer(joined, dtype=np.uint8).astype(np.uint16)
