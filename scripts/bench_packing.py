"""Benchmark of data.packing: example lengths over big label shards, the packing plan, fill rates, reads.

python scripts/bench_packing.py [--rows 1000000] [--examples 2000000] [--dir /tmp/bench_packing] [--corpus]

1. a synthetic instruct shard of ``--rows`` rows of 350 (TinyStories-like: prompt 30-60 tokens not counted,
   BOS + story of 100-300 tokens + EOS counted, longer than 350 dropped): time of ``split_lengths`` (warm
   page cache), time of the plan, fill rates (packed vs padded), packed rows read per second;
2. the plan alone on ``--examples`` TinyStories-like lengths, for windows 1..1024, against the best possible
   (two-pointer pairing, optimal here since no three examples fit a row);
3. with ``--corpus``: the offline synthetic corpus (make_corpus, 512-piece tokenizer, rows of 256), as the demo.
CPU only; numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llamalit.data.datasets import InstructRows, read_manifest, shard_files
from llamalit.data.packing import PackedInstructRows, plan_packing, split_lengths

ROW_LEN, IGNORE, EOS = 350, -100, 2


def tinystories_like(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, example lengths) kept under the row length, as the preparation drops longer ones."""
    prompt, story = rng.integers(30, 61, n), rng.integers(100, 301, n)
    total = prompt + 1 + story + 1
    keep = total <= ROW_LEN
    return prompt[keep], total[keep]


def write_shard(root: Path, rows: int, rng: np.random.Generator, chunk: int = 50_000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok_file, lab_file = root / "data01.tokens.bin", root / "data01.labels.bin"
    with tok_file.open("wb") as ft, lab_file.open("wb") as fl:
        written, col = 0, np.arange(ROW_LEN)
        while written < rows:
            prompt, total = tinystories_like(chunk, rng)
            prompt, total = prompt[: rows - written], total[: rows - written]
            ids = rng.integers(3, 32000, (len(total), ROW_LEN)).astype(np.uint16)
            ids[col >= total[:, None]] = EOS
            labels = np.where((col >= prompt[:, None]) & (col < total[:, None]), ids.astype(np.int32), IGNORE)
            ids.tofile(ft)
            labels.astype(np.int32).tofile(fl)
            written += len(total)
    shard = {"split": "train", "source": "data01.json", "tokens": tok_file.name, "labels": lab_file.name,
             "token_dtype": "uint16", "label_dtype": "int32", "rows": rows, "n_tokens": rows * ROW_LEN, "dropped": 0}
    manifest = {"format": "llamalit-shards/1", "kind": "instruct", "seq_len": ROW_LEN, "ignore_index": IGNORE,
                "pad_id": EOS, "tokenizer": {"path": None, "sha256": None, "vocab_size": 32000, "bos_id": 1,
                                             "eos_id": EOS}, "shards": [shard]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def bench_shard(root: Path) -> None:
    m = read_manifest(root)
    args = (shard_files(m, root, "train"), ROW_LEN, 32000, IGNORE)
    rows = InstructRows(*args)
    split_lengths(rows)  # warm the page cache
    t = time.perf_counter()
    lengths = split_lengths(rows)
    t_len = time.perf_counter() - t
    t = time.perf_counter()
    packed = PackedInstructRows(*args, EOS, seed=0, lengths=lengths)
    t_plan = time.perf_counter() - t
    s = packed.stats
    print(f"[shard] {rows.n_rows} rows x {ROW_LEN}: lengths {t_len:.2f} s, plan of {s['examples']} examples "
          f"{t_plan:.2f} s -> {s['packed_rows']} packed rows, fill {s['fill_rate']:.3f} vs padded "
          f"{s['padded_fill_rate']:.3f}")
    order = packed.shuffled(0, 0)[:20_000]
    t = time.perf_counter()
    for i in order:
        packed[int(i)]
    t_packed = time.perf_counter() - t
    t = time.perf_counter()
    for i in rows.shuffled(0, 0)[:20_000]:
        rows[int(i)]
    t_rows = time.perf_counter() - t
    print(f"[shard] reads: {len(order) / t_packed:.0f} packed rows/s vs {len(order) / t_rows:.0f} padded rows/s "
          f"(useful positions/s: {len(order) * s['fill_rate'] / t_packed * (ROW_LEN - 1):.3g} vs "
          f"{len(order) * s['padded_fill_rate'] / t_rows * (ROW_LEN - 1):.3g})")


def bench_plan(n: int, rng: np.random.Generator) -> None:
    _, lengths = tinystories_like(n, rng)
    sizes = np.sort(lengths - 1)
    i, j, bins = 0, len(sizes) - 1, 0
    while i <= j:  # two-pointer pairing: optimal when no three examples fit one row
        i += bool(i < j and sizes[i] + sizes[j] <= ROW_LEN - 1)
        j -= 1
        bins += 1
    padded = sizes.sum() / (len(sizes) * (ROW_LEN - 1))
    print(f"[plan] {len(lengths)} examples, padded fill {padded:.3f}, best possible {sizes.sum() / (bins * 349):.3f}")
    for window in (1, 4, 16, 64, 256, 1024):
        t = time.perf_counter()
        plan = plan_packing(lengths, ROW_LEN - 1, seed=0, window=window)
        print(f"[plan] window {window:5d}: {time.perf_counter() - t:5.2f} s, fill {plan.fill_rate:.4f}, "
              f"{len(plan)} rows")


def bench_corpus(root: Path) -> None:
    from llamalit.data.prepare import prepare

    cfg = {"name": "bench", "kind": "instruct", "format": "tinystories", "source": "synthetic", "n_shards": 5,
           "stories_per_shard": 2000, "seed": 0, "tokenizer": "train:512", "dir": str(root / "synthetic"),
           "seq_len": 256, "num_workers": 2}
    manifest = prepare(cfg, root / "cache")
    m = read_manifest(manifest)
    packed = PackedInstructRows(shard_files(m, manifest.parent, "train"), 256, m["tokenizer"]["vocab_size"],
                                IGNORE, m["pad_id"], seed=0)
    s = packed.stats
    print(f"[corpus] synthetic demo corpus, rows of 256: {s['examples']} examples -> {s['packed_rows']} packed rows,"
          f" fill {s['fill_rate']:.3f} vs padded {s['padded_fill_rate']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--examples", type=int, default=2_000_000)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--corpus", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.dir or Path(tmp)
        bench_shard(write_shard(root / "shard", a.rows, rng))
        bench_plan(a.examples, rng)
        if a.corpus:
            bench_corpus(root)


if __name__ == "__main__":
    main()
