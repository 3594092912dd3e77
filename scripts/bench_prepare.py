"""Pretokenization throughput: llamalit's parallel pipeline vs a single-process reference of the seeds' algorithm.

    python scripts/bench_prepare.py --stories 50000 --shards 20 --vocab 32000 --workers 1,2 \
        --extra-text "$(python -c 'import site; print(site.getsitepackages()[0])')"

Builds a synthetic TinyStories-schema corpus and trains a BPE vocab with llama2.c's settings on its
stories (the synthetic grammar alone supports ~1.4K pieces, so ``--extra-text`` adds up to 15 MB of
local text files to reach a Llama 2-sized 32K vocab), or uses ``--tokenizer PATH`` (e.g. Llama 2's
tokenizer.model). Then, in the same run, for each kind:
- reference: llama2.c's ``process_shard`` (pretrain) / Instruct Llama's per-example loop (instruct):
  one process, ``encode`` per story, Python lists, ``np.array`` at the end;
- llamalit: ``run_jobs`` (batch encode per shard, a process pool of N workers), for each N.
Outputs are checked to hold the same tokens. Prints a Markdown table (stories/s, speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llamalit.data.pretokenize import ShardJob, run_jobs
from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import shorten_prompt
from llamalit.data.tokenizer import Tokenizer, train_tokenizer


def reference_pretrain(tok: Tokenizer, shard: Path, out: Path) -> int:
    """llama2.c ``process_shard``: BOS + story per example, one uint16 file per shard."""
    with open(shard) as f:
        data = json.load(f)
    all_tokens = []
    for example in data:
        text = example["story"].strip()
        tokens = tok.encode(text, bos=True, eos=False)
        all_tokens.extend(tokens)
    np.array(all_tokens, dtype=np.uint16).tofile(out / (shard.stem + ".bin"))
    return len(data)


def reference_instruct(tok: Tokenizer, shard: Path, out: Path, seq_len: int) -> int:
    """Instruct Llama: prompt + BOS + story + EOS, labels -100 on the prompt, lists padded with -100, int16."""
    with open(shard) as f:
        data = json.load(f)
    all_tokens, all_labels = [], []
    for example in data:
        prompt = tok.encode(shorten_prompt(example["instruction"]["prompt:"]), bos=False, eos=False)
        story = tok.encode(example["story"].strip(), bos=True, eos=True)
        tokens = prompt + story
        if len(tokens) > seq_len:
            continue
        labels = [-100] * len(prompt) + story
        all_tokens.append(tokens + [-100] * (seq_len - len(tokens)))
        all_labels.append(labels + [-100] * (seq_len - len(labels)))
    np.array(all_tokens, dtype=np.int16).tofile(out / (shard.stem + ".tokens.bin"))
    np.array(all_labels, dtype=np.int16).tofile(out / (shard.stem + ".labels.bin"))
    return len(data)


def extra_text(where: str, limit: int = 15_000_000) -> list[str]:
    """Up to ``limit`` characters of text files under ``where``, for a larger vocabulary."""
    root = Path(where)
    paths = [root] if root.is_file() else sorted(p for ext in ("py", "txt", "md") for p in root.rglob(f"*.{ext}"))
    texts, size = [], 0
    for p in paths:
        if size >= limit:
            break
        text = p.read_text(errors="replace")[: limit - size]
        texts.append(text)
        size += len(text)
    return texts


def same_output(kind: str, ref: Path, ours: Path, names: list[str], eos: int) -> bool:
    for name in names:
        if kind == "pretrain":
            if (ref / f"{name}.bin").read_bytes() != (ours / f"{name}.bin").read_bytes():
                return False
            continue
        rt = np.fromfile(ref / f"{name}.tokens.bin", dtype=np.int16).astype(np.int32)
        rl = np.fromfile(ref / f"{name}.labels.bin", dtype=np.int16).astype(np.int32)
        ot = np.fromfile(ours / f"{name}.tokens.bin", dtype=np.uint16).astype(np.int32)
        ol = np.fromfile(ours / f"{name}.labels.bin", dtype=np.int32)
        if not (np.array_equal(np.where(rt == -100, eos, rt), ot) and np.array_equal(rl, ol)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", type=int, default=50_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32_000, help="requested vocab (capped by the corpus)")
    ap.add_argument("--tokenizer", help="use this .model instead of training one")
    ap.add_argument("--extra-text", help="a file or directory (*.py, *.txt, *.md) to widen the vocab's training text")
    ap.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated pool sizes")
    ap.add_argument("--kinds", default="pretrain,instruct")
    ap.add_argument("--seq-len", type=int, default=350)
    ap.add_argument("--work-dir", help="default: a temp dir, removed at the end")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llamalit-bench-"))
    try:
        t = time.perf_counter()
        files = make_corpus(work / "corpus", args.shards, args.stories // args.shards, seed=0)
        n_stories = args.shards * (args.stories // args.shards)
        t_corpus = time.perf_counter() - t
        t = time.perf_counter()
        if args.tokenizer:
            tok_path = Path(args.tokenizer)
        else:
            texts = [r["story"] + "\n" + shorten_prompt(r["instruction"]["prompt:"])
                     for f in files[1:] for r in json.loads(f.read_text())]
            texts += extra_text(args.extra_text) if args.extra_text else []
            tok_path = train_tokenizer(texts, args.vocab, work / "tok.model", hard_vocab_limit=False)
        t_tok = time.perf_counter() - t
        tok = Tokenizer(tok_path)
        workers = [int(w) for w in args.workers.split(",")]
        print(f"# {n_stories} stories in {args.shards} shards (made in {t_corpus:.1f} s), vocab {tok.vocab_size} "
              f"(requested {args.vocab}; {'given' if args.tokenizer else f'trained in {t_tok:.1f} s'}), "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"sentencepiece {spm.__version__}, numpy {np.__version__}\n")
        print("| kind | implementation | processes | seconds | stories/s | speedup vs reference | same tokens |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind in args.kinds.split(","):
            ref_dir = work / f"ref-{kind}"
            ref_dir.mkdir()
            t = time.perf_counter()
            for f in files:
                if kind == "pretrain":
                    reference_pretrain(tok, f, ref_dir)
                else:
                    reference_instruct(tok, f, ref_dir, args.seq_len)
            t_ref = time.perf_counter() - t
            print(f"| {kind} | reference (seeds' loop) | 1 | {t_ref:.2f} | {n_stories / t_ref:,.0f} | 1.00x | - |",
                  flush=True)
            for n in workers:
                out = work / f"ours-{kind}-{n}"
                jobs = [ShardJob(name=f.stem, source=str(f), split="train", out_dir=str(out), kind=kind,
                                 seq_len=args.seq_len if kind == "instruct" else None,
                                 tokenizer_path=str(tok_path), tokenizer_sha256=tok.sha256) for f in files]
                t = time.perf_counter()
                run_jobs(jobs, n, progress=False)
                t_ours = time.perf_counter() - t
                same = same_output(kind, ref_dir, out, [f.stem for f in files], tok.eos_id)
                print(f"| {kind} | llamalit run_jobs | {n} | {t_ours:.2f} | {n_stories / t_ours:,.0f} | "
                      f"{t_ref / t_ours:.2f}x | {'yes' if same else 'NO'} |", flush=True)
                shutil.rmtree(out)
            shutil.rmtree(ref_dir)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
