"""build_model: a model from a config or a checkpoint, then LoRA exactly when the settings say so."""

from __future__ import annotations

import pytest
import torch

from llamalit.checkpoints import load_checkpoint, save_model
from llamalit.model.build import build_model, lora_config
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, lora_layers

RUN_LORA = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wv"]}
RUN_NO_LORA = {"enabled": False, "rank": 0, "alpha": 0, "dropout": 0.0, "targets": []}


def test_from_config_mapping_or_dataclass():
    cfg = ModelConfig.preset("tiny")
    as_mapping = {**cfg.to_dict(), "quantize": None, "gradient_checkpointing": False}  # a run's model section
    for given in (cfg, as_mapping):
        model = build_model(given)
        assert model.cfg == cfg and not lora_layers(model)


@pytest.mark.parametrize("lora", [None, {}, RUN_NO_LORA])
def test_no_lora_settings_no_adapters(lora):
    model = build_model(ModelConfig.preset("tiny"), lora)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("lora", [RUN_LORA, LoraConfig(rank=2, alpha=4.0, targets=("wq", "wv")),
                                  {k: v for k, v in RUN_LORA.items() if k != "enabled"}])
def test_lora_settings_wrap_the_targets(lora):
    model = build_model(ModelConfig.preset("tiny"), lora)
    layers = lora_layers(model)
    assert {name.rpartition(".")[2] for name in layers} == {"wq", "wv"}
    assert {m.rank for m in layers.values()} == {2}
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)


def test_init_from_checkpoint_keeps_its_shape_and_weights_and_grows_the_context(tmp_path):
    torch.manual_seed(0)
    base = Llama(ModelConfig.preset("tiny"))
    save_model(base, tmp_path / "base")
    longer = {**ModelConfig.preset("tiny", dim=64, n_heads=8).to_dict(), "max_seq_len": 2 * base.cfg.max_seq_len}
    model = build_model(longer, RUN_LORA, init_from=load_checkpoint(tmp_path / "base"))
    assert model.cfg.dim == base.cfg.dim and model.cfg.max_seq_len == longer["max_seq_len"]
    assert model.freqs_cos.shape[0] == longer["max_seq_len"]
    assert torch.equal(model.tok_embeddings.weight, base.tok_embeddings.weight)
    assert lora_layers(model)


def test_init_from_a_model_in_memory_wraps_it_in_place():
    base = Llama(ModelConfig.preset("tiny"))
    assert build_model(None, RUN_LORA, init_from=base) is base
    assert lora_layers(base)


def test_init_from_a_path_is_refused_build_model_never_reads_files():
    with pytest.raises(TypeError, match="load_checkpoint"):
        build_model(None, None, init_from="org/name")


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="model_cfg"):
        build_model(None)
    with pytest.raises(ValueError, match="rank"):
        lora_config({"enabled": True, "rank": 0, "alpha": 1.0})


def test_attention_backend_is_given_to_the_model_it_builds():
    """New models get ``attention`` from Llama's constructor; a loaded model is checked against its own heads; None
    keeps a loaded model's backend."""
    wide, narrow = ModelConfig.preset("tiny", dim=64), ModelConfig.preset("tiny")  # head_dim 16, 8
    assert build_model(wide, attention="flex").attention_backend == "flex"
    assert build_model(narrow).attention_backend == "auto"
    with pytest.raises(ValueError, match="head_dim 8"):
        build_model(narrow, attention="flex")
    loaded = Llama(narrow, attention="dense")
    assert build_model(None, init_from=loaded).attention_backend == "dense"
    assert build_model(None, init_from=loaded, attention="auto").attention_backend == "auto"
    with pytest.raises(ValueError, match="head_dim 8"):
        build_model(wide, init_from=Llama(narrow), attention="flex")  # the loaded heads decide, not model_cfg's
