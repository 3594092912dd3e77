"""Prepared data that must not be trusted: interrupted re-prepares, a replaced tokenizer, an edited or broken
manifest, a corrupt ``data.tokenizer``, a ``data.dir`` that is a file (audit of session 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llamalit.data.pretokenize as pretok
from llamalit.data.datamodule import LlamaDataModule
from llamalit.data.prepare import ManifestError, run_prepare
from llamalit.data.tokenizer import TokenizerError


def _cfg(data: Path, corpus: list[Path], tok, **extra) -> dict:
    """The conftest fixture's settings (so its shards are reused), plus what the datamodule needs."""
    return {"name": "t", "kind": "instruct", "format": "tinystories", "source": str(corpus[0].parent),
            "tokenizer": str(tok.path), "dir": str(data), "seq_len": 256, "num_workers": 1, "batch_size": 4,
            "loader_workers": 0, "packing": False, **extra}


def _copy(prepared: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(prepared.parent, data)
    return data


def _labels(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.glob("*.labels.bin"))}


def _interrupt_after(monkeypatch, name: str, calls: int) -> None:
    """Make ``pretokenize.<name>`` raise KeyboardInterrupt on its ``calls``-th call (a Ctrl-C there)."""
    real, seen = getattr(pretok, name), []

    def stop(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretok, name, stop)


# ---- 1. an interrupted re-prepare is never trusted --------------------------------------------------------------
def test_interrupted_reprepare_leaves_no_manifest_and_training_redoes_the_mix(
        tmp_path, prepared_instruct, synthetic_corpus, tiny_tokenizer, monkeypatch):
    data = _copy(prepared_instruct, tmp_path)
    cfg = _cfg(data, synthetic_corpus, tiny_tokenizer)
    original = _labels(data)
    _interrupt_after(monkeypatch, "pretokenize_shard", 3)  # 2 of 3 shards redone with train_on_inputs
    with pytest.raises(KeyboardInterrupt):
        run_prepare({**cfg, "train_on_inputs": True}, tmp_path / "cache", progress=False)
    monkeypatch.undo()
    assert _labels(data) != original                                   # a mix of new and old shards ...
    assert not (data / "manifest.json").exists()                       # ... that no manifest vouches for
    dm = LlamaDataModule(cfg, cache_dir=tmp_path / "cache")
    dm.prepare_data()                                                  # the original settings: prepared again
    assert _labels(data) == original
    dm.setup("fit")
    assert dm.manifest["prepared_from"]["train_on_inputs"] is False


def test_shard_interrupted_between_its_files_and_its_meta_is_redone(
        tmp_path, prepared_instruct, synthetic_corpus, tiny_tokenizer, monkeypatch):
    data = _copy(prepared_instruct, tmp_path)
    cfg = _cfg(data, synthetic_corpus, tiny_tokenizer)
    original = _labels(data)
    _interrupt_after(monkeypatch, "atomic_write_json", 1)  # data00's arrays written, its meta not yet
    with pytest.raises(KeyboardInterrupt):
        run_prepare({**cfg, "train_on_inputs": True}, tmp_path / "cache", progress=False)
    monkeypatch.undo()
    assert _labels(data)["data00.labels.bin"] != original["data00.labels.bin"]
    result = run_prepare(cfg, tmp_path / "cache", progress=False)
    # data00 is not trusted by its old meta (dropped before its files changed); the shards the stopped run
    # never reached still hold the original settings' files and are reused
    assert result.shards_skipped == len(original) - 1
    assert _labels(data) == original


def test_changed_settings_prepare_again_instead_of_reusing_the_shards(
        tmp_path, prepared_instruct, synthetic_corpus, tiny_tokenizer):
    data = _copy(prepared_instruct, tmp_path)
    original = _labels(data)
    dm = LlamaDataModule(_cfg(data, synthetic_corpus, tiny_tokenizer, train_on_inputs=True),
                         cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"other settings \(train_on_inputs: False -> True\)"):
        dm.prepare_data()
    assert dm.manifest["prepared_from"]["train_on_inputs"] is True
    new = _labels(data)
    assert new.keys() == original.keys() and all(new[k] != original[k] for k in new)
    tokens = np.fromfile(data / "data01.tokens.bin", dtype=np.uint16)
    assert np.array_equal(np.fromfile(data / "data01.labels.bin", dtype=np.int32)[tokens != 2][:50],
                          tokens[tokens != 2][:50])                    # the prompt counts now


# ---- 2, 3. the tokenizer must be the one the manifest records ---------------------------------------------------
def test_replaced_tokenizer_is_refused_and_prepare_repairs_it(tmp_path, prepared_instruct, synthetic_corpus,
                                                              tiny_tokenizer):
    data = _copy(prepared_instruct, tmp_path)
    cfg = _cfg(data, synthetic_corpus, tiny_tokenizer)
    (data / "tokenizer.model").write_bytes(b"garbage" * 100)
    for step in ("prepare_data", "setup"):
        with pytest.raises(ManifestError) as err:
            getattr(LlamaDataModule(cfg, cache_dir=tmp_path / "cache"), step)()
        msg = str(err.value)
        assert f"{data / 'tokenizer.model'}: sha256" in msg and str(data / "manifest.json") in msg, msg
        assert "scripts/prepare.py" in msg and f"delete {data}" in msg
    run_prepare(cfg, tmp_path / "cache", progress=False)               # what the message says: repairs it
    assert (data / "tokenizer.model").read_bytes() == tiny_tokenizer.path.read_bytes()
    dm = LlamaDataModule(cfg, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 512


def test_manifest_vocab_size_must_equal_the_tokenizers(tmp_path, prepared_instruct, synthetic_corpus,
                                                       tiny_tokenizer):
    data = _copy(prepared_instruct, tmp_path)
    cfg = _cfg(data, synthetic_corpus, tiny_tokenizer)
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["vocab_size"] = 1000
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"manifest\.json: tokenizer\.vocab_size is 1000 but the tokenizer "
                                            r".*tokenizer\.model has 512"):
        LlamaDataModule(cfg, cache_dir=tmp_path / "cache").setup("fit")
    run_prepare(cfg, tmp_path / "cache", progress=False)               # not "up to date": rewritten
    assert json.loads(path.read_text())["tokenizer"]["vocab_size"] == 512


# ---- 4. a broken manifest is reported, not hidden behind a new preparation --------------------------------------
def _no_format(data: Path) -> None:
    path = data / "manifest.json"
    path.write_text(path.read_text().replace('"llamalit-shards/1"', '"other/2"'))


@pytest.fixture(scope="module")
def gone_source(synthetic_corpus, tiny_tokenizer, tmp_path_factory) -> tuple[Path, dict]:
    """Shards prepared from a source that is gone since (as an unreachable URL would be): (data dir, cfg)."""
    root = tmp_path_factory.mktemp("gone")
    shutil.copytree(synthetic_corpus[0].parent, root / "src")
    cfg = _cfg(root / "data", [root / "src" / "data00.json"], tiny_tokenizer)
    run_prepare(cfg, root / "cache", progress=False)
    shutil.rmtree(root / "src")
    return root / "data", cfg


@pytest.mark.parametrize("damage, message", [
    (_no_format, r"manifest\.json: format is 'other/2'"),
    (lambda d: (d / "data01.tokens.bin").unlink(), r"data01\.tokens\.bin is missing"),
    (lambda d: (d / "data02.labels.bin").write_bytes(b"\0" * 8), r"data02\.labels\.bin holds 2 int32 values"),
])
def test_broken_manifest_raises_its_own_error(tmp_path, gone_source, damage, message):
    data = _copy(gone_source[0] / "manifest.json", tmp_path)
    damage(data)
    cfg = {**gone_source[1], "dir": str(data)}  # preparing again would fail with "data.source=...: no such file"
    with pytest.raises((ManifestError, OSError, ValueError), match=message) as err:
        LlamaDataModule(cfg, cache_dir=tmp_path / "cache").prepare_data()
    assert "data.source" not in str(err.value) and "delete" in str(err.value)


def test_data_dir_without_manifest_is_still_prepared(tmp_path, synthetic_corpus, tiny_tokenizer):
    data = tmp_path / "fresh"
    dm = LlamaDataModule(_cfg(data, synthetic_corpus, tiny_tokenizer), cache_dir=tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    assert (data / "manifest.json").is_file() and dm.vocab_size == 512


# ---- 5. a corrupt data.tokenizer is named and never copied ------------------------------------------------------
def test_corrupt_configured_tokenizer_is_named_and_not_copied(tmp_path, synthetic_corpus, tiny_tokenizer):
    bad = tmp_path / "x" / "corrupt.model"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00not a sentencepiece model" * 20)
    data = tmp_path / "out"
    with pytest.raises(TokenizerError) as err:
        run_prepare(_cfg(data, synthetic_corpus, tiny_tokenizer, tokenizer=str(bad)), tmp_path, progress=False)
    assert f"data.tokenizer='{bad}'" in str(err.value) and str(data) not in str(err.value)
    assert not (data / "tokenizer.model").exists()


# ---- 6. data.dir that is a file --------------------------------------------------------------------------------
def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path, synthetic_corpus, tiny_tokenizer):
    file = tmp_path / "somefile"
    file.write_text("x")
    for target in (file, file / "sub"):
        cfg = _cfg(target, synthetic_corpus, tiny_tokenizer)
        with pytest.raises(NotADirectoryError, match=rf"data\.dir={target}: {file} is a file, not a directory"):
            run_prepare(cfg, tmp_path / "cache", progress=False)
        with pytest.raises(NotADirectoryError, match=r"data\.dir=.* is a file"):
            LlamaDataModule(cfg, cache_dir=tmp_path / "cache").prepare_data()
    assert file.read_text() == "x"


# ---- a local data.source that is not an archive ---------------------------------------------------------------
def test_a_local_archive_that_is_not_one_is_named_without_download_advice(tmp_path, tiny_tokenizer):
    bad = tmp_path / "stories.tar.gz"
    bad.write_bytes(b"not a tar archive at all")
    cfg = {"name": "t", "kind": "instruct", "format": "tinystories", "source": str(bad),
           "tokenizer": str(tiny_tokenizer.path), "dir": str(tmp_path / "data"), "seq_len": 256, "num_workers": 1,
           "sha256": None}
    with pytest.raises(Exception, match=rf"{bad}: not a readable tar archive .*data\.source must be") as err:
        run_prepare(cfg, tmp_path / "cache", progress=False)
    assert "download" not in str(err.value) and bad.read_bytes() == b"not a tar archive at all"
