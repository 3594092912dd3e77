"""Hugging Face Hub ids, offline, through the real huggingface_hub code against a Hub cache built here.

The cache follows huggingface_hub's documented layout: ``HF_HUB_CACHE/models--org--name/refs/main``
(the commit), ``snapshots/<commit>/<file>`` (links into ``blobs/``), ``blobs/<sha256>``; datasets under
``datasets--org--name``. ``HF_HUB_OFFLINE=1``: nothing is downloaded, only the cache is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import llamalit.cli
from llamalit.checkpoints import load_checkpoint, save_hf, save_peft
from llamalit.cli.generate import run_generate
from llamalit.data.prepare import run_prepare
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora
from llamalit.utils.hub import HubError, HubRef, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
             commit: str = COMMIT, ref: str = "main") -> Path:
    """One revision of a repository in the Hub cache layout; returns its snapshot folder."""
    org, name = repo_id.split("/")
    repo = cache / f"{repo_type}s--{org}--{name}"
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative names resolve here: no local "acme/..." unless a test makes one
    return cache


def tiny(vocab: int, seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny", vocab_size=vocab)).eval()


def same(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_hub_id_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("acme/tiny") == HubRef("acme/tiny")
    assert parse_hub_id("acme/tiny@v1.0") == HubRef("acme/tiny", None, "v1.0")
    assert parse_hub_id("karpathy/tinyllamas/stories15M.pt") == HubRef("karpathy/tinyllamas", "stories15M.pt")
    for not_hub in ("https://huggingface.co/acme/tiny", "./acme/tiny", "/abs/path", "~/models/demo", "model.pt",
                    "acme/../etc", "", None):
        assert parse_hub_id(not_hub) is None, not_hub
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    assert parse_hub_id("acme/tiny") is None  # a path that exists locally wins


def test_checkpoint_by_hub_id_offline_from_the_cache(hub, tmp_path, tiny_tokenizer):
    model = tiny(tiny_tokenizer.vocab_size, seed=0)
    save_hf(model, tmp_path / "export", tokenizer=tiny_tokenizer.path)
    hub_repo(hub, "acme/tiny-llama", folder_files(tmp_path / "export"))
    assert same(load_checkpoint("acme/tiny-llama"), model)
    assert same(load_checkpoint(f"acme/tiny-llama@{COMMIT}"), model)
    # generate's ckpt= (its tokenizer comes from the snapshot too)
    new = run_generate({"ckpt": "acme/tiny-llama", "prompt": "Once", "max_new_tokens": 4, "temperature": 0.0,
                        "device": "cpu"}, out=open(os.devnull, "w"))
    assert len(new) >= 1
    with pytest.raises(HubError, match=r"acme/tiny-llama@v2: .*has no revision|acme/tiny-llama@v2: not in"):
        load_checkpoint("acme/tiny-llama@v2")


def test_hub_id_not_cached_offline_is_one_clear_error(hub):
    with pytest.raises(HubError) as err:
        load_checkpoint("acme/never-downloaded")
    msg = str(err.value)
    assert "acme/never-downloaded" in msg and "HF_HUB_OFFLINE" in msg and str(hub) in msg
    assert isinstance(err.value, OSError)  # the CLIs print it as one "error:" line


def test_local_path_wins_over_the_hub_id(hub, tmp_path):
    save_hf(tiny(256, seed=1), tmp_path / "export")
    hub_repo(hub, "acme/tiny-llama", folder_files(tmp_path / "export"))
    local = tiny(256, seed=2)
    save_hf(local, tmp_path / "acme" / "tiny-llama")  # ./acme/tiny-llama, relative to the working directory
    assert same(load_checkpoint("acme/tiny-llama"), local)


def test_peft_adapter_on_the_hub_finds_its_hub_base(hub, tmp_path):
    base = tiny(256, seed=3)
    save_hf(base, tmp_path / "base")
    hub_repo(hub, "acme/tiny-llama", folder_files(tmp_path / "base"))
    lora = apply_lora(tiny(256, seed=3), LoraConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_peft(lora, tmp_path / "adapter", base="acme/tiny-llama")
    hub_repo(hub, "acme/tiny-lora", folder_files(tmp_path / "adapter"))
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint("acme/tiny-lora")(tokens), lora.eval()(tokens),
                                   atol=1e-5, rtol=1e-5)


def dolly_cfg(tmp_path: Path, tokenizer: Path, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("prepare", overrides=["data=dolly", f"paths.cache_dir={tmp_path / 'cache'}",
                                            f"data.tokenizer={tokenizer}", "data.records_per_shard=10",
                                            "data.num_workers=1", *overrides])
    return cfg


def dolly_records(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "context": "", "response": f"{i} it is.", "category": "open_qa"}
            for i in range(n)]


def test_dataset_by_hub_id_offline_from_the_cache(hub, tmp_path, tiny_tokenizer):
    """data=dolly with data.source=hub: the config's hub_id (databricks/databricks-dolly-15k), its .jsonl."""
    jsonl = "\n".join(json.dumps(r) for r in dolly_records(25)).encode()
    hub_repo(hub, "databricks/databricks-dolly-15k", {"databricks-dolly-15k.jsonl": jsonl, "README.md": b"# card"},
             repo_type="dataset")
    cfg = dolly_cfg(tmp_path, tiny_tokenizer.path, ["data.source=hub"])
    assert cfg.data.hub_id == "databricks/databricks-dolly-15k"
    result = run_prepare(cfg.data, cfg.paths.cache_dir, progress=False)
    manifest = json.loads(result.manifest_path.read_text())
    assert result.stories == 25 and len(manifest["shards"]) == 3  # 25 records cut in shards of 10
    with pytest.raises(HubError, match="acme/no-such-data"):
        run_prepare(dolly_cfg(tmp_path, tiny_tokenizer.path, ["data.source=acme/no-such-data"]).data,
                    str(tmp_path / "cache"), progress=False)


def test_parquet_dataset_by_hub_id(hub, tmp_path, tiny_tokenizer):
    """tatsu-lab/alpaca ships Parquet (data/train-*.parquet): records read with pyarrow."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1), "text": ""} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    hub_repo(hub, "tatsu-lab/alpaca", {"data/train-00000-of-00001.parquet": (tmp_path / "train.parquet").read_bytes()},
             repo_type="dataset")
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("prepare", overrides=["data=alpaca", "data.source=tatsu-lab/alpaca",
                                            f"paths.cache_dir={tmp_path / 'cache'}", "data.num_workers=1",
                                            f"data.tokenizer={tiny_tokenizer.path}", "data.records_per_shard=10"])
    assert run_prepare(cfg.data, cfg.paths.cache_dir, progress=False).stories == 30


def test_lora_run_with_init_from_a_hub_id(hub, tmp_path, tiny_tokenizer):
    """init_from=org/name trains an adapter on the cached Hub model; the adapter names the id and reloads."""
    from omegaconf import open_dict

    from llamalit.training.run import train

    base = tiny(tiny_tokenizer.vocab_size, seed=4)
    save_hf(base, tmp_path / "export", tokenizer=tiny_tokenizer.path)
    hub_repo(hub, "acme/tiny-llama", folder_files(tmp_path / "export"))
    run_dir = tmp_path / "run"
    overrides = ["experiment=demo_lora", "init_from=acme/tiny-llama", f"run_dir={run_dir}", "logger=none",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"data.tokenizer={tiny_tokenizer.path}",
                 "data.n_shards=2", "data.stories_per_shard=40", "data.batch_size=4", "data.num_workers=1",
                 "trainer.fast_dev_run=true", "trainer.enable_model_summary=false", "evaluation.adherence_n=0",
                 "callbacks.samples.max_new_tokens=4", "trainer.accelerator=cpu"]
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    summary = train(cfg)
    assert summary["step"] == 1 and summary["trainable_params"] < summary["params"]
    meta = json.loads((run_dir / "llamalit_adapter.json").read_text())
    assert meta["base"] == "acme/tiny-llama" and len(meta["base_sha256"]) == 64
    merged = load_checkpoint(run_dir)  # the base comes from the Hub cache again
    assert merged.cfg.vocab_size == base.cfg.vocab_size
