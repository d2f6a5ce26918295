"""`prepare` with a BPE tokenizer against HF tokenizers' own `encode_batch` on the same text.

    python bench/bench_prepare.py                          # 4 MB of the built-in corpus, vocab 8192
    python bench/bench_prepare.py --max-bytes 16000000 --vocab 32000 --reps 7

The built-in corpus (the standard library's sources, capped at --max-bytes) trains a byte-level BPE
once. Then each repetition times, in alternating order, (a) `tokenizer.encode_batch` over the corpus
already in memory, one document per file, and (b) the whole `prepare(..., tokenizer=...)`: reading
the files, encoding, writing train.bin/val.bin and meta.json into a fresh folder. The figure is the
median over repetitions of the ratio of throughputs, prepare / encode_batch (1.0 = prepare costs
nothing beyond the encoding; the target is >= 0.8), beside each side's median MB/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from scaletrain.data import documents, tokenizer
from scaletrain.data import prepare as prep


def corpus(max_bytes: int) -> tuple[list[Path], list[str]]:
    """The files prepare reads for `prepare([], max_bytes=...)`, and their text as documents."""
    files, docs, total = [], [], 0
    for f in documents.default_corpus_files():
        data = f.read_bytes()[: max_bytes - total]
        files.append(f)
        docs.append(data.decode("utf-8", errors="replace"))
        total += len(data)
        if total >= max_bytes:
            break
    return files, docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=4_000_000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    files, docs = corpus(args.max_bytes)
    nbytes = sum(len(d.encode()) for d in docs)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        tok = tokenizer.train_tokenizer(docs, args.vocab)
        print(f"trained BPE vocab {args.vocab} on {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        tok.save(str(tmp / "tokenizer.json"))

        def run_encode() -> float:
            t = time.perf_counter()
            tok.encode_batch(docs, add_special_tokens=False)
            return time.perf_counter() - t

        def run_prepare() -> float:
            t = time.perf_counter()
            prep.prepare([], tmp / "out", max_bytes=args.max_bytes, tokenizer=tmp / "tokenizer.json", force=True)
            return time.perf_counter() - t

        run_encode(), run_prepare()  # warm-up: page cache, thread pools
        enc, pre, ratios = [], [], []
        for r in range(args.reps):
            if r % 2:
                p, e = run_prepare(), run_encode()
            else:
                e, p = run_encode(), run_prepare()
            enc.append(e)
            pre.append(p)
            ratios.append(e / p)
        meta = (tmp / "out" / "meta.json").read_text()
    mbs = lambda t: nbytes / t / 1e6  # noqa: E731
    print(f"{len(files)} files, {nbytes / 1e6:.1f} MB; {args.reps} interleaved repetitions")
    print(f"encode_batch: median {mbs(statistics.median(enc)):.2f} MB/s")
    print(f"prepare:      median {mbs(statistics.median(pre)):.2f} MB/s (read + encode + write + split)")
    print(f"prepare / encode_batch throughput: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(meta.strip().replace("\n", " "))


if __name__ == "__main__":
    main()
