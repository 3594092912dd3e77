"""``scripts/prepare.py`` / ``llamalit-prepare``, the conf/data group, the manifest and its refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import llamalit.data.prepare as prep
from llamalit.cli import CONF_DIR
from llamalit.data.prepare import ManifestError, data_settings, load_manifest, run_prepare, verify_tokenizer
from llamalit.data.tokenizer import Tokenizer, TokenizerError

REPO = Path(__file__).resolve().parents[2]
NAMES = ["alpaca", "dolly", "synthetic", "tinystories", "tinystories_instruct"]
SUMMARY = re.compile(r"prepared (\S+): (\d+) stories, (\d+) tokens, (\d+) dropped, [\d.]+ s")


def _cli(*overrides: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMALIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare.py"), "progress=false", *overrides],
                          capture_output=True, text=True, env=env, timeout=120)


def test_every_data_config_composes_with_the_training_keys(tmp_path):
    assert sorted(p.stem for p in (Path(CONF_DIR) / "data").glob("*.yaml")) == NAMES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name in NAMES:
            cfg = compose("prepare", overrides=[f"data={name}", f"paths.cache_dir={tmp_path}"])
            d = cfg.data
            for key in ("name", "kind", "source", "tokenizer", "dir", "seq_len", "val_shards", "num_workers",
                        "batch_size", "loader_workers", "packing"):
                assert key in d, (name, key)
            assert d.name == name and d.dir == f"{tmp_path}/data/{name}" and list(d.val_shards) == ["data00"]
            assert d.packing is (None if name in ("alpaca", "dolly", "tinystories_instruct") else False)  # null: auto
            settings = data_settings(d)
            assert settings["kind"] in ("pretrain", "instruct")
    assert (cfg.data.kind, cfg.data.seq_len) == ("instruct", 350)  # tinystories_instruct, last
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        syn = compose("prepare", overrides=["data=synthetic"]).data
        assert (syn.tokenizer, syn.kind, syn.source) == ("train:512", "instruct", "synthetic")


def test_cli_prepares_real_format_shards_readable_through_the_manifest(tmp_path, synthetic_corpus,
                                                                       tiny_tokenizer):
    out = tmp_path / "shards"
    args = ["data=tinystories_instruct", f"data.source={synthetic_corpus[0].parent}",
            f"data.tokenizer={tiny_tokenizer.path}", "data.tokenizer_sha256=null", f"data.dir={out}",
            "data.num_workers=2"]
    run = _cli(*args, cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    match = SUMMARY.search(run.stdout)
    assert match and Path(match[1]) == out / "manifest.json" and match[2] == "360", run.stdout
    # a reader with nothing but the manifest
    m = json.loads((out / "manifest.json").read_text())
    seq = m["seq_len"]
    for shard in m["shards"]:
        tokens = np.fromfile(out / shard["tokens"], dtype=shard["token_dtype"]).reshape(shard["rows"], seq)
        labels = np.fromfile(out / shard["labels"], dtype=shard["label_dtype"]).reshape(shard["rows"], seq)
        counted = labels != m["ignore_index"]
        assert (tokens[counted] == labels[counted]).all() and tokens.max() < m["tokenizer"]["vocab_size"]
        assert (tokens[:, 0] != m["tokenizer"]["bos_id"]).all()  # rows start with the prompt
    assert Tokenizer(out / m["tokenizer"]["path"]).sha256 == m["tokenizer"]["sha256"]
    again = _cli(*args, cache=tmp_path / "cache")
    assert "0 shards tokenized, 3 reused" in again.stdout, again.stdout + again.stderr


def test_console_script_runs_the_synthetic_demo_data(tmp_path):
    exe = shutil.which("llamalit-prepare", path=str(Path(sys.executable).parent)) or shutil.which("llamalit-prepare")
    assert exe, "llamalit-prepare is not installed; pip install -e ."
    env = {**os.environ, "LLAMALIT_CACHE": str(tmp_path)}
    run = subprocess.run([exe, "data=synthetic", "data.n_shards=2", "data.stories_per_shard=150", "progress=false"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    m = load_manifest(tmp_path / "data" / "synthetic")
    assert m["tokenizer"]["vocab_size"] == 512 and [s["split"] for s in m["shards"]] == ["val", "train"]
    assert (tmp_path / "data" / "synthetic" / "tokenizer.bin").is_file()
    assert SUMMARY.search(run.stdout)[2] == "300"


def test_manifest_refuses_a_replaced_tokenizer_or_damaged_shard(tmp_path, prepared_instruct, tiny_tokenizer):
    data = tmp_path / "copy"
    shutil.copytree(prepared_instruct.parent, data)
    verify_tokenizer(load_manifest(data), tiny_tokenizer)
    other = tmp_path / "other.model"
    shutil.copy(REPO / "tests" / "conftest.py", other)  # any other bytes
    with pytest.raises(TokenizerError, match="other.model: sha256 .* differs .* prepare the data again"):
        verify_tokenizer(load_manifest(data), other)
    (data / "tokenizer.model").write_bytes(b"something else")
    with pytest.raises(ManifestError, match="tokenizer.model: sha256 .* differs from the manifest's"):
        load_manifest(data)
    shutil.copy(prepared_instruct.parent / "tokenizer.model", data / "tokenizer.model")
    (data / "data01.labels.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ManifestError, match="data01.labels.bin: missing or not .* bytes"):
        load_manifest(data)
    with pytest.raises(ManifestError, match="no manifest; run `llamalit-prepare"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ManifestError, match="bad.json: unreadable manifest"):
        load_manifest(tmp_path / "bad.json")


def test_too_large_vocab_is_refused_before_any_shard(tmp_path, synthetic_corpus, tiny_tokenizer, monkeypatch):
    class Huge(Tokenizer):
        def __init__(self, path):
            super().__init__(path)
            self.vocab_size = 70_000

    monkeypatch.setattr(prep, "Tokenizer", Huge)
    cfg = {"kind": "pretrain", "source": str(synthetic_corpus[0].parent), "tokenizer": str(tiny_tokenizer.path),
           "dir": str(tmp_path / "out"), "num_workers": 1}
    with pytest.raises(TokenizerError, match="vocab_size 70000 does not fit token dtype uint16"):
        run_prepare(cfg, tmp_path, progress=False)
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".bin" or p.name == "manifest.json"]


def test_prepare_is_idempotent_and_cheap_when_done(tmp_path, prepared_pretrain, synthetic_corpus, tiny_tokenizer):
    cfg = {"kind": "pretrain", "source": str(synthetic_corpus[0].parent), "tokenizer": str(tiny_tokenizer.path),
           "dir": str(prepared_pretrain.parent), "num_workers": 1}
    before = {p.name: p.stat().st_mtime_ns for p in prepared_pretrain.parent.iterdir()}
    result = run_prepare(cfg, tmp_path, progress=False)
    assert result.manifest_path == prepared_pretrain and result.shards_done == 0 and result.stories == 360
    assert {p.name: p.stat().st_mtime_ns for p in prepared_pretrain.parent.iterdir()} == before
