"""The README.md model card of a run's exports, read back with huggingface_hub's own parser (``ModelCard``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import llamalit.cli
from llamalit.checkpoints.model_card import base_model_id, dataset_ids, write_model_card, write_run_cards

SUMMARY = {"experiment": "instruct_lora", "val/loss": 1.2345678, "val/ppl": 3.437, "uniform_loss": 10.37,
           "step": 2000, "tokens_seen": 358400000, "tokens_per_s": 51234.5, "params": 15_191_712,
           "trainable_params": 13_824, "adherence": {"adherence": 0.625, "word_recall": 0.81, "n": 32},
           "files": {"adapter": "x/adapter_model.safetensors"}}
CFG = {"experiment_name": "instruct_lora",
       "init_from": "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories15M.pt",
       "data": {"name": "tinystories_instruct", "hub_id": "roneneldan/TinyStories", "tokenizer": "tok.model",
                "source": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"},
       "model": {"dim": 288, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6, "vocab_size": 32000, "max_seq_len": 350},
       "lora": {"enabled": True, "rank": 2, "alpha": 1.0, "targets": ["wq", "wk", "wv", "wo"]},
       "export": {"license": "mit"}}


def test_hub_ids_of_bases_and_datasets(tmp_path):
    assert base_model_id(CFG["init_from"]) == "karpathy/tinyllamas"
    assert base_model_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0@main") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert base_model_id(str(tmp_path)) is None and base_model_id(None) is None
    assert dataset_ids(CFG["data"]) == ["roneneldan/TinyStories"]
    assert dataset_ids({"source": "hub", "hub_id": "tatsu-lab/alpaca"}) == ["tatsu-lab/alpaca"]
    assert dataset_ids({"source": "databricks/databricks-dolly-15k"}) == ["databricks/databricks-dolly-15k"]
    assert dataset_ids({"source": "synthetic"}) == [] and dataset_ids({"source": str(tmp_path)}) == []


@pytest.mark.parametrize("kind, library", [("adapter", "peft"), ("merged", "transformers")])
def test_card_parses_with_the_hub_metadata(tmp_path, kind, library):
    card = ModelCard.load(write_model_card(tmp_path, SUMMARY, CFG, kind))
    data = card.data.to_dict()
    assert {k: data[k] for k in ("base_model", "datasets", "library_name", "pipeline_tag", "license")} == {
        "base_model": "karpathy/tinyllamas", "datasets": ["roneneldan/TinyStories"], "library_name": library,
        "pipeline_tag": "text-generation", "license": "mit"}
    assert data["base_model_relation"] == ("adapter" if kind == "adapter" else "merge")
    assert {"llamalit", "llama", "lora"} <= set(data["tags"])
    for row in ("| validation loss | 1.235 |", "| optimizer steps | 2,000 |", "| tokens seen | 358,400,000 |",
                "| adherence: adherence | 0.625 |", "| adherence: word_recall | 0.81 |"):
        assert row in card.text


def test_local_base_license_and_plain_run(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    cfg = {**CFG, "init_from": str(base), "lora": {"enabled": False}, "data": {"source": "synthetic"}}
    data = ModelCard.load(write_model_card(tmp_path / "run", {"val/loss": 2.0, "step": 3}, cfg)).data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert "base_model" not in data and "datasets" not in data  # a local base, a synthetic corpus


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_demo_run_writes_cards_beside_its_exports(tmp_path):
    """A real (tiny) ``experiment=demo`` run: README.md in the run directory and in export_dir, parsed by the
    Hub's parser, with the run's own numbers; transformers still loads the directory."""
    import transformers
    from hydra import compose, initialize_config_dir

    from llamalit.training.run import train

    overrides = ["experiment=demo", f"paths.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
                 f"export_dir={tmp_path / 'shared'}", "logger=none", "model=tiny", "data.n_shards=3",
                 "data.stories_per_shard=60", "data.tokenizer=train:384", "data.batch_size=4", "data.num_workers=1",
                 "data.loader_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=4",
                 "trainer.limit_val_batches=1", "evaluation.adherence_n=2", "evaluation.max_new_tokens=8",
                 "callbacks.samples.max_new_tokens=8", "trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=str(Path(llamalit.cli.CONF_DIR)), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for folder in (tmp_path / "run", tmp_path / "shared"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert f"| optimizer steps | {on_disk['step']} |" in card.text
        assert f"| validation loss | {on_disk['val/loss']:.4g} |" in card.text
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert summary["step"] == 4
    assert write_run_cards(cfg, on_disk, tmp_path / "run") == [tmp_path / "run" / "README.md"]
