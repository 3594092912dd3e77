"""Parallel pretokenization of JSON shards into the flat / row arrays described by CONTRACT.md.

One job per input shard, run in a process pool. Each job writes its arrays atomically and then a
small ``<name>.meta.json`` with the settings it was made with; a later run with the same settings
(and tokenizer sha256, and unchanged input file) skips it, so an interrupted run resumes.
``n_tokens`` of a shard is the element count of its tokens file (rows x seq_len for instruct).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llamalit.data.text_formats import read_records, text_for_kind
from llamalit.data.tokenizer import Tokenizer
from llamalit.utils.fileio import atomic_path, atomic_write_json

IGNORE_INDEX = -100  # same value as llamalit.model.llama.IGNORE_INDEX (not imported: workers stay torch-free)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
TOKEN_DTYPE = "uint16"
LABEL_DTYPE = "int32"

_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}  # per process, keyed by (path, sha256)


@dataclass(frozen=True)
class ShardJob:
    """One input shard: ``records[start:stop]`` of ``source`` become ``out_dir/<name>.*``."""

    name: str
    source: str
    split: str
    out_dir: str
    tokenizer_path: str
    kind: str
    format: str = "tinystories"
    seq_len: int | None = None
    train_on_inputs: bool = False
    start: int | None = None
    stop: int | None = None
    tokenizer_sha256: str = ""
    extra_key: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The manifest's ``source``: the file name, with the record range for chunked files."""
        name = Path(self.source).name
        return name if self.start is None else f"{name}[{self.start}:{self.stop}]"

    def key(self) -> dict:
        """Everything the output depends on; a shard on disk with another key is redone."""
        st = Path(self.source).stat()
        return {"kind": self.kind, "format": self.format, "seq_len": self.seq_len,
                "train_on_inputs": self.train_on_inputs, "source": self.label, "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns, "tokenizer_sha256": self.tokenizer_sha256,
                "token_dtype": TOKEN_DTYPE, "label_dtype": LABEL_DTYPE, **self.extra_key}


def _tokenizer(path: str, sha256: str) -> Tokenizer:
    if (path, sha256) not in _TOKENIZERS:
        _TOKENIZERS[(path, sha256)] = Tokenizer(path)
    return _TOKENIZERS[(path, sha256)]


def pretrain_tokens(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """BOS + text for every text, concatenated into one flat uint16 array (Baby Llama)."""
    encoded = tok.encode_batch(texts, bos=True)
    total = sum(map(len, encoded))
    return np.fromiter(chain.from_iterable(encoded), dtype=TOKEN_DTYPE, count=total)


def instruct_rows(tok: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int, fmt: str = "tinystories",
                  train_on_inputs: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [rows, seq_len] uint16, labels [rows, seq_len] int32, dropped) of (prompt, answer) pairs.

    TinyStories: prompt + BOS + story + EOS. Alpaca/Dolly: BOS + prompt + response + EOS. Labels copy
    the tokens of the answer part (BOS, story, EOS / response, EOS), or of everything when
    ``train_on_inputs``; other positions hold IGNORE_INDEX. Padding in tokens is EOS (a real id).
    Examples longer than ``seq_len`` are dropped and counted.
    """
    prompts = tok.encode_batch([p for p, _ in pairs])
    answers = tok.encode_batch([a for _, a in pairs])
    bos, eos = [tok.bos_id], [tok.eos_id]
    rows = []
    for p, a in zip(prompts, answers):
        head, tail = (p, bos + a + eos) if fmt == "tinystories" else (bos + p, a + eos)
        if len(head) + len(tail) <= seq_len:
            rows.append((head, tail))
    tokens = np.full((len(rows), seq_len), tok.eos_id, dtype=TOKEN_DTYPE)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=LABEL_DTYPE)
    for i, (head, tail) in enumerate(rows):
        n, h = len(head) + len(tail), len(head)
        tokens[i, :n] = head + tail
        labels[i, 0 if train_on_inputs else h:n] = tokens[i, 0 if train_on_inputs else h:n]
    return tokens, labels, len(pairs) - len(rows)


def _files(job: ShardJob) -> tuple[Path, Path | None]:
    out = Path(job.out_dir)
    if job.kind == "pretrain":
        return out / f"{job.name}.bin", None
    return out / f"{job.name}.tokens.bin", out / f"{job.name}.labels.bin"


def meta_path(job: ShardJob) -> Path:
    return Path(job.out_dir) / f"{job.name}.meta.json"


def existing_result(job: ShardJob) -> dict | None:
    """The recorded result of a shard already done with the same key, if its files are intact."""
    try:
        meta = json.loads(meta_path(job).read_text())
        if meta["key"] != job.key():
            return None
        entry = meta["entry"]
        tokens, labels = _files(job)
        if tokens.stat().st_size != entry["n_tokens"] * 2:
            return None
        if labels is not None and labels.stat().st_size != entry["n_tokens"] * 4:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    entry["split"] = job.split  # the split is the reader's choice, not part of the content
    return {**meta, "skipped": True}


def pretokenize_shard(job: ShardJob) -> dict:
    """Tokenize one shard (or reuse it when already done): ``{"entry", "stories", "skipped"}``."""
    done = existing_result(job)
    if done is not None:
        return done
    tok = _tokenizer(job.tokenizer_path, job.tokenizer_sha256)
    path = Path(job.source)
    records = read_records(path)
    start = job.start or 0
    chosen = records[start:job.stop] if job.start is not None else records
    items = [text_for_kind(job.kind, job.format, r, path, start + i) for i, r in enumerate(chosen)]
    tokens_path, labels_path = _files(job)
    entry = {"split": job.split, "source": job.label, "tokens": tokens_path.name,
             "labels": labels_path.name if labels_path else None, "token_dtype": TOKEN_DTYPE,
             "label_dtype": LABEL_DTYPE, "rows": None, "n_tokens": 0, "dropped": 0}
    if job.kind == "pretrain":
        tokens = pretrain_tokens(tok, [text for _, text in items])
    else:
        tokens, labels, dropped = instruct_rows(tok, items, job.seq_len, job.format, job.train_on_inputs)
    # an earlier run's meta must not vouch for files this one is about to replace (if it stops half way)
    meta_path(job).unlink(missing_ok=True)
    if job.kind != "pretrain":
        with atomic_path(labels_path) as tmp:
            labels.tofile(tmp)
        entry.update(rows=int(tokens.shape[0]), dropped=dropped)
    with atomic_path(tokens_path) as tmp:
        tokens.tofile(tmp)
    entry["n_tokens"] = int(tokens.size)
    meta = {"key": job.key(), "entry": entry, "stories": len(items)}
    atomic_write_json(meta_path(job), meta)
    return {**meta, "skipped": False}


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when the process that started it dies, even by kill -9 (which runs no
    cleanup there), so no worker is left tokenizing for nobody (nor the resource tracker it keeps alive)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:  # elsewhere: poll; a dead parent's children are re-parented
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_jobs(jobs: Sequence[ShardJob], num_workers: int = 1, progress: bool = True) -> list[dict]:
    """:func:`pretokenize_shard` over ``jobs`` with a pool of ``num_workers`` processes; results in job order.

    On the first error the pending jobs are cancelled and the error is raised; shards already
    finished stay valid and are skipped by the next run.
    """
    results: list[dict | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="pretokenize", unit="shard", disable=not progress)
    with bar:
        if num_workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = pretokenize_shard(job)
                bar.update()
            return results
        ctx = multiprocessing.get_context("spawn")  # safe when the caller holds threads (torch, Lightning)
        with ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=ctx, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(pretokenize_shard, job): i for i, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return results
