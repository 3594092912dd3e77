"""Pretokenized shards: layouts of CONTRACT.md, Alpaca/Dolly templates, resume, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamalit.data.prepare import load_manifest, run_prepare
from llamalit.data.pretokenize import IGNORE_INDEX, ShardJob, instruct_rows, run_jobs
from llamalit.data.text_formats import ALPACA_TEMPLATE_NO_INPUT, DataFormatError, read_records, shorten_prompt
from llamalit.model.llama import IGNORE_INDEX as MODEL_IGNORE_INDEX

SRC = Path(__file__).resolve().parents[2] / "src"


def _rows(shard: dict, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.memmap(shard["tokens"], dtype=shard["token_dtype"], mode="r").reshape(shard["rows"], seq_len)
    labels = np.memmap(shard["labels"], dtype=shard["label_dtype"], mode="r").reshape(shard["rows"], seq_len)
    return tokens, labels


def test_pretrain_shards_are_bos_plus_story(prepared_pretrain, synthetic_corpus, tiny_tokenizer):
    m = load_manifest(prepared_pretrain)
    assert m["kind"] == "pretrain" and m["seq_len"] is None and m["ignore_index"] == -100
    assert [(s["split"], s["source"], s["labels"]) for s in m["shards"]] == [
        ("val", "data00.json", None), ("train", "data01.json", None), ("train", "data02.json", None)]
    for shard, src in zip(m["shards"], synthetic_corpus):
        flat = np.fromfile(shard["tokens"], dtype=np.uint16)
        assert flat.size == shard["n_tokens"] and flat[0] == tiny_tokenizer.bos_id
        starts = np.flatnonzero(flat == tiny_tokenizer.bos_id)
        stories = [tiny_tokenizer.decode(part[1:]) for part in np.split(flat, starts[1:])]
        assert stories == [r["story"].strip() for r in read_records(src)]


def test_instruct_rows_follow_the_contract(prepared_instruct, synthetic_corpus, tiny_tokenizer):
    tok = tiny_tokenizer
    m = load_manifest(prepared_instruct)
    assert IGNORE_INDEX == MODEL_IGNORE_INDEX == m["ignore_index"]
    assert (m["kind"], m["seq_len"], m["pad_id"]) == ("instruct", 256, tok.eos_id)
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["vocab_size"] == 512
    for shard, src in zip(m["shards"], synthetic_corpus):
        records = read_records(src)
        assert shard["rows"] + shard["dropped"] == len(records) and shard["n_tokens"] == shard["rows"] * 256
        tokens, labels = _rows(shard, 256)
        kept = [r for r in records
                if len(tok.encode(shorten_prompt(r["instruction"]["prompt:"]), False)) + len(tok.encode(r["story"]))
                + 1 <= 256]
        for row, lab, r in zip(tokens, labels, kept):
            prompt = tok.encode(shorten_prompt(r["instruction"]["prompt:"]), bos=False)
            body = tok.encode(r["story"], bos=True, eos=True)
            n = len(prompt) + len(body)
            assert row[:n].tolist() == prompt + body
            assert (row[n:] == tok.eos_id).all()  # padding is a real id
            assert (lab[:len(prompt)] == IGNORE_INDEX).all() and (lab[n:] == IGNORE_INDEX).all()
            assert lab[len(prompt):n].tolist() == body  # BOS, story, EOS count in the loss


def test_instruct_rows_drop_long_examples_and_train_on_inputs(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [("Write a story. Possible story:", "Tom ran."), ("Write a story.", "Tom ran. " * 40)]
    tokens, labels, dropped = instruct_rows(tok, pairs, 40)
    assert tokens.shape == (1, 40) and dropped == 1 and tokens.dtype == np.uint16 and labels.dtype == np.int32
    tokens, labels, _ = instruct_rows(tok, pairs[:1], 40, train_on_inputs=True)
    n = int((labels[0] != IGNORE_INDEX).sum())
    assert n == len(tok.encode(pairs[0][0], False)) + len(tok.encode("Tom ran.", bos=True, eos=True))
    assert labels[0, :n].tolist() == tokens[0, :n].tolist() and (labels[0, n:] == IGNORE_INDEX).all()


def _prepare_alpaca(tmp_path, tok, fmt: str, records: list[dict], **extra):
    src = tmp_path / ("data.jsonl" if fmt == "dolly" else "alpaca_data.json")
    text = "\n".join(json.dumps(r) for r in records) if fmt == "dolly" else json.dumps(records)
    src.write_text(text)
    cfg = {"kind": "instruct", "format": fmt, "source": str(src), "tokenizer": str(tok.path), "seq_len": 200,
           "dir": str(tmp_path / "out"), "records_per_shard": 3, "num_workers": 1, **extra}
    return load_manifest(run_prepare(cfg, tmp_path / "cache", progress=False).manifest_path)


@pytest.mark.parametrize("fmt", ["alpaca", "dolly"])
def test_alpaca_and_dolly_use_the_template_and_mask_the_prompt(tmp_path, tiny_tokenizer, fmt):
    tok = tiny_tokenizer
    if fmt == "alpaca":
        records = [{"instruction": f"Name a pet {i}.", "input": "" if i % 2 else "a home", "output": "A cat."}
                   for i in range(7)]
    else:
        records = [{"instruction": f"Name a pet {i}.", "context": "" if i % 2 else "a home", "response": "A cat.",
                    "category": "open_qa"} for i in range(7)]
    m = _prepare_alpaca(tmp_path, tok, fmt, records)
    assert [(s["split"], s["source"].split("[")[1], s["rows"]) for s in m["shards"]] == [
        ("val", "0:3]", 3), ("train", "3:6]", 3), ("train", "6:7]", 1)]
    tokens, labels = _rows(m["shards"][0], 200)
    text = tok.decode(tokens[1])
    assert text.startswith(ALPACA_TEMPLATE_NO_INPUT.format(instruction="Name a pet 1.").rstrip("\n"))
    assert tokens[0, 0] == tok.bos_id and "### Input:\na home" in tok.decode(tokens[0])
    counted = labels[1][labels[1] != IGNORE_INDEX].tolist()
    assert counted == tok.encode("A cat.", bos=False, eos=True)  # the response and EOS only
    m2 = _prepare_alpaca(tmp_path, tok, fmt, records, train_on_inputs=True, dir=str(tmp_path / "all"))
    tokens2, labels2 = _rows(m2["shards"][0], 200)
    assert (labels2[tokens2 != tok.eos_id] == tokens2[tokens2 != tok.eos_id]).all()


def _cfg(corpus: list[Path], tok, out: Path, **extra) -> dict:
    return {"kind": "instruct", "source": str(corpus[0].parent), "tokenizer": str(tok.path), "dir": str(out),
            "seq_len": 256, "num_workers": 1, **extra}


def test_rerun_skips_finished_shards_and_redoes_the_rest(tmp_path, synthetic_corpus, tiny_tokenizer):
    cfg = _cfg(synthetic_corpus, tiny_tokenizer, tmp_path / "out")
    first = run_prepare(cfg, tmp_path, progress=False)
    assert (first.shards_done, first.shards_skipped, first.stories) == (3, 0, 360)
    again = run_prepare(cfg, tmp_path, progress=False)
    assert (again.shards_done, again.shards_skipped, again.stories) == (0, 3, 360)
    # an interrupted run: manifest never written, one shard missing
    keep = (tmp_path / "out" / "data00.tokens.bin").stat().st_mtime_ns
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "data02.tokens.bin").unlink()
    resumed = run_prepare(cfg, tmp_path, progress=False)
    assert (resumed.shards_done, resumed.shards_skipped) == (1, 2)
    assert (tmp_path / "out" / "data00.tokens.bin").stat().st_mtime_ns == keep
    assert load_manifest(resumed.manifest_path)["shards"] == load_manifest(first.manifest_path)["shards"]
    resplit = run_prepare({**cfg, "val_shards": ["data02"]}, tmp_path, progress=False)  # same content
    assert resplit.shards_done == 0
    assert [s["split"] for s in load_manifest(resplit.manifest_path)["shards"]] == ["train", "train", "val"]
    changed = run_prepare({**cfg, "seq_len": 300}, tmp_path, progress=False)  # other settings: all redone
    assert changed.shards_done == 3 and load_manifest(changed.manifest_path)["seq_len"] == 300


def test_parallel_pool_gives_the_same_bytes(tmp_path, synthetic_corpus, tiny_tokenizer):
    def jobs(out):
        return [ShardJob(name=f.stem, source=str(f), split="train", out_dir=str(out), kind="pretrain",
                         tokenizer_path=str(tiny_tokenizer.path)) for f in synthetic_corpus]
    serial, parallel = run_jobs(jobs(tmp_path / "a"), 1, False), run_jobs(jobs(tmp_path / "b"), 2, False)
    assert [r["entry"] for r in serial] == [r["entry"] for r in parallel]
    for f in synthetic_corpus:
        assert (tmp_path / "a" / f"{f.stem}.bin").read_bytes() == (tmp_path / "b" / f"{f.stem}.bin").read_bytes()


BAD_INPUTS = {
    "invalid_json": (b'[{"story": "a"}, {"story": "b"]', r"data01.json: invalid JSON near record 1"),
    "no_story": (json.dumps([{"story": "a", "instruction": {"prompt:": "p"}}, {"instruction": {"prompt:": "p"}}]).encode(),
                 r"data01.json: record 1 has no 'story' field"),
    "no_instruction": (json.dumps([{"story": "a"}]).encode(), r"data01.json: record 0 has no 'instruction' field"),
    "not_utf8": (b'[{"story": "\xff\xfe"}]', r"data01.json: cannot read it"),
    "not_a_list": (b'{"story": "a"}', r"data01.json: expected a JSON array"),
}


@pytest.mark.parametrize("case, workers", [(c, 1) for c in sorted(BAD_INPUTS)] + [("no_story", 2)])
def test_bad_input_names_the_file_and_record(tmp_path, synthetic_corpus, tiny_tokenizer, case, workers):
    src = tmp_path / "src"
    src.mkdir()
    good = read_records(synthetic_corpus[0])[:5]
    (src / "data00.json").write_text(json.dumps(good))
    (src / "data01.json").write_bytes(BAD_INPUTS[case][0])
    cfg = _cfg([src / "data00.json"], tiny_tokenizer, tmp_path / "out", num_workers=workers)
    with pytest.raises(DataFormatError, match=BAD_INPUTS[case][1]):
        run_prepare(cfg, tmp_path, progress=False)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "data01.tokens.bin").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written


def test_missing_source_is_a_clear_error(tmp_path, tiny_tokenizer):
    cfg = _cfg([tmp_path / "nowhere" / "x.json"], tiny_tokenizer, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere.*no such file or directory"):
        run_prepare(cfg, tmp_path, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no data\\*.json files"):
        run_prepare({**cfg, "source": str(empty)}, tmp_path, progress=False)
    with pytest.raises(DataFormatError, match="file not found"):
        read_records(tmp_path / "gone.json")
    with pytest.raises(ValueError, match="data.seq_len"):
        run_prepare({**cfg, "seq_len": None}, tmp_path, progress=False)


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_and_resource_tracker_die_with_a_killed_parent(tmp_path, tiny_tokenizer):
    """kill -9 of the process running the pool (no cleanup runs there) takes its workers and the resource
    tracker with it. The workers are held inside their jobs by FIFOs as sources that never deliver data."""
    fifos = [tmp_path / f"data0{i}.json" for i in (1, 2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    script = (
        "import sys\nfrom llamalit.data.pretokenize import ShardJob, run_jobs\n"
        f"jobs = [ShardJob(name=f'data0{{i}}', source=src, split='train', out_dir={str(tmp_path / 'out')!r}, "
        f"tokenizer_path={str(tiny_tokenizer.path)!r}, kind='pretrain') for i, src in enumerate({list(map(str, fifos))!r})]\n"
        "run_jobs(jobs, num_workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)})
    writers: list[int] = []
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(writers) < len(fifos):  # a writer can open a FIFO only once a worker opened it to read
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never reached their jobs"
            try:
                writers.append(os.open(fifos[len(writers)], os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.2)
        descendants = _children(proc.pid)
        assert len(descendants) >= 3  # two workers and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while (alive := {p for p in descendants if Path(f"/proc/{p}").exists() and
                         "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:1]}) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running after their parent was killed: {sorted(alive)}"
    finally:
        for fd in writers:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
        for pid in descendants:  # without the fix they outlive the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
