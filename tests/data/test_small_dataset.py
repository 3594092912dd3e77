"""A small dataset of one's own: a .json/.jsonl with fewer records than ``records_per_shard`` is split by
records (``data.val_size``), the split is in the manifest, an empty or unusable file says so, and train.py
trains and validates on 12 records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamalit.data.manifest import load_manifest
from llamalit.data.prepare import run_prepare

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Name pet number {i}.", "context": "",
                                        "response": f"The cat number {i} sat on the mat."}) + "\n"
                            for i in range(n)))
    return path


def cfg(tmp_path: Path, src: Path, tok, **extra) -> dict:
    return {"kind": "instruct", "format": "dolly", "source": str(src), "tokenizer": str(tok.path), "seq_len": 128,
            "dir": str(tmp_path / "out"), "num_workers": 1, **extra}


@pytest.mark.parametrize("n, val_size, val", [(12, 0.1, 1), (12, 3, 3), (2, 0.1, 1), (40, 0.25, 10)])
def test_small_file_is_split_by_records(tmp_path, tiny_tokenizer, n, val_size, val):
    src = write_jsonl(tmp_path / "mine.jsonl", n)
    m = load_manifest(run_prepare(cfg(tmp_path, src, tiny_tokenizer, val_size=val_size), tmp_path / "c",
                                  progress=False).manifest_path)
    assert [(s["split"], s["source"], s["rows"]) for s in m["shards"]] == [
        ("val", f"mine.jsonl[0:{val}]", val), ("train", f"mine.jsonl[{val}:{n}]", n - val)]
    assert m["split"] == {"by": "records", "val_size": val_size, "records": n, "val_records": val,
                          "train_records": n - val, "val": f"records [0:{val}] of mine.jsonl"}


def test_a_big_file_keeps_its_shards(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "big.jsonl", 7)
    m = load_manifest(run_prepare(cfg(tmp_path, src, tiny_tokenizer, records_per_shard=3), tmp_path / "c",
                                  progress=False).manifest_path)
    assert [s["split"] for s in m["shards"]] == ["val", "train", "train"] and "split" not in m


@pytest.mark.parametrize("text, match", [
    ("[]", r"holds 0 records"),
    ("", r"holds 0 records"),
    ('[{"question": "a", "answer": "b"}, {"question": "c"}]',
     r"none of its 2 records is a usable data.format=dolly record.*fields found: \['answer', 'question'\]"),
    ('[{"instruction": "a", "context": "", "response": "b"}]', r"1 record; .*at least 2 records"),
])
def test_empty_or_unusable_file_says_so(tmp_path, tiny_tokenizer, text, match):
    src = tmp_path / "mine.json"
    src.write_text(text)
    with pytest.raises(ValueError, match=match):
        run_prepare(cfg(tmp_path, src, tiny_tokenizer), tmp_path / "c", progress=False)


def test_val_size_leaving_nothing_to_train_is_refused(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "mine.jsonl", 5)
    with pytest.raises(ValueError, match=r"data.val_size=5: 5 validation records of the 5 .*at most 4"):
        run_prepare(cfg(tmp_path, src, tiny_tokenizer, val_size=5), tmp_path / "c", progress=False)


def test_train_py_trains_and_validates_on_12_records(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "mine.jsonl", 12)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=demo", "model=tiny", "logger=none", "data=dolly",
         f"data.source={src}", f"data.tokenizer={tiny_tokenizer.path}", "data.seq_len=128", "data.batch_size=4",
         "data.num_workers=1", "data.loader_workers=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
         "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "evaluation.adherence_n=0",
         "callbacks.samples.max_new_tokens=2", f"paths.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
         "export_dir=null"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val/loss"] is not None
    manifest = json.loads((tmp_path / "cache" / "data" / "dolly" / "manifest.json").read_text())
    assert manifest["split"]["val_records"] == 1 and manifest["split"]["train_records"] == 11
