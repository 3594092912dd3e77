"""LoRA: configured values reach the right layers, no-op at start, merge parity, frozen base, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import llamalit.cli
from llamalit.checkpoints.adapter import is_adapter_dir, load_adapter, save_adapter
from llamalit.checkpoints.native import load_model, save_model
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import (
    LoraConfig,
    LoRALinear,
    adapter_num_params,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
)

CONF = Path(llamalit.cli.CONF_DIR) / "lora"
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def tiny(seed: int = 0, dtype=torch.float64) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny")).to(dtype).eval()


def tokens(seed: int = 1, b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def randomise_b(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.1)


def train_steps(model: Llama, n: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(5, 2, 17)
    for _ in range(n):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("cfg", [
    LoraConfig(rank=3, alpha=7.0, dropout=0.25, targets=("wk", "w2")),
    LoraConfig(rank=5, alpha=2.0, dropout=0.4, targets=("wq", "wv", "w3", "output")),
])
def test_configured_values_reach_every_target_and_no_other(cfg):
    model = apply_lora(tiny(), cfg)
    seen = set()
    for name, m in model.named_modules():
        suffix = name.rpartition(".")[2]
        if suffix in cfg.targets:
            assert isinstance(m, LoRALinear), name
            assert m.lora_A.shape == (cfg.rank, m.in_features)
            assert m.lora_B.shape == (m.out_features, cfg.rank)
            assert m.scaling == pytest.approx(cfg.alpha / cfg.rank)
            assert m.lora_dropout.p == pytest.approx(cfg.dropout)
            assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
            seen.add(suffix)
        elif suffix in ALL:
            assert type(m) is nn.Linear, name
    assert seen == set(cfg.targets)
    n_targets = sum(1 for name, _ in model.named_modules() if name.rpartition(".")[2] in cfg.targets)
    assert len(lora_layers(model)) == n_targets


def test_lora_config_from_yaml_ignores_enabled_and_validates():
    qkvo = LoraConfig.from_dict(OmegaConf.load(CONF / "qkvo.yaml"))
    assert qkvo == LoraConfig(rank=2, alpha=1, dropout=0.1, targets=("wq", "wk", "wv", "wo"))
    full = LoraConfig.from_dict(OmegaConf.load(CONF / "all_linear.yaml"))
    assert (full.rank, full.alpha, full.dropout, full.targets) == (64, 16, 0.1, ALL[:-1])
    assert set(OmegaConf.load(CONF / "none.yaml")) == set(OmegaConf.load(CONF / "qkvo.yaml"))
    assert LoraConfig(2, 1, targets="wq, wo").targets == ("wq", "wo")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig.from_dict(OmegaConf.load(CONF / "none.yaml"))
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(2, 1, dropout=1.0)


def test_unknown_target_names_the_available_linears():
    with pytest.raises(ValueError, match=r"\['wqq'\].*available linears: \['output', 'w1'"):
        apply_lora(tiny(), LoraConfig(2, 1, targets=("wq", "wqq")))
    model = apply_lora(tiny(), LoraConfig(2, 1))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(2, 1))


def test_fresh_adapter_leaves_outputs_unchanged():
    x = tokens()
    base = tiny()
    ref = base(x)
    model = apply_lora(base, LoraConfig(4, 8, targets=ALL))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_wrapper_follows_the_models_train_eval_mode():
    model = apply_lora(tiny(), LoraConfig(2, 1, dropout=0.5))  # tiny() is in eval mode
    assert not any(m.training for m in model.modules())
    randomise_b(model)
    x = tokens()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_dropout_is_on_the_lora_path_only():
    x = tokens()
    ref = tiny()(x)
    model = apply_lora(tiny(), LoraConfig(4, 8, dropout=0.5, targets=ALL)).train()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # B = 0: dropout must not touch the base path
    randomise_b(model)
    assert not torch.equal(model(x), model(x))  # the LoRA path is dropped at random in training
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ALL])
def test_merged_equals_unmerged_after_training(targets):
    model = apply_lora(tiny(), LoraConfig(2, 4, dropout=0.1, targets=targets))
    train_steps(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, tiny()(x))  # training moved the outputs
        merged = merge_lora(model)
    assert not lora_layers(merged) and all(type(m) is nn.Linear for n, m in merged.named_modules()
                                           if n.rpartition(".")[2] in ALL)
    assert not lora_state_dict(merged)
    assert all(p.requires_grad for p in merged.parameters())  # a plain model again, not a frozen one
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-12, atol=1e-12)


def test_in_place_merge_and_unmerge_roundtrip():
    model = apply_lora(tiny(), LoraConfig(2, 4))
    randomise_b(model)
    x = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    for layer in lora_layers(model).values():
        layer.merge_()
    assert all(layer.merged for layer in lora_layers(model).values())
    assert not torch.equal(model.layers[0].attention.wq.weight, before["layers.0.attention.wq.weight"])
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    merge_lora(model)  # after an in-place merge: drops the wrappers, keeps the folded weights
    assert not lora_layers(model)
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    model = apply_lora(tiny(), LoraConfig(2, 4))
    randomise_b(model)
    for layer in lora_layers(model).values():
        layer.merge_()
        layer.unmerge_()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-15)


def test_gradients_reach_only_adapters_and_base_never_moves():
    model = apply_lora(tiny(), LoraConfig(2, 1, targets=ALL))
    adapters = {id(p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == adapters
    assert not model.tok_embeddings.weight.requires_grad and not model.norm.weight.requires_grad
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    x = tokens(5, 2, 17)
    model.train()
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lora_layers(model).values())
    opt.step()
    train_steps(model, 2)
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k


def test_base_checkpoint_loads_with_exactly_the_adapter_keys_missing():
    plain = tiny(seed=7)
    base_sd = plain.state_dict()
    cfg = LoraConfig(2, 1)
    model = apply_lora(tiny(seed=8), cfg)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    expected = {f"layers.{i}.attention.{w}.{ab}" for i in range(2) for w in cfg.targets
                for ab in ("lora_A", "lora_B")}
    assert set(missing) == expected and unexpected == []
    assert "layers.0.attention.wq.weight" in model.state_dict()
    x = tokens()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_tied_output_targeting_keeps_the_tie_and_the_frozen_embedding():
    model = apply_lora(tiny(), LoraConfig(2, 4, targets=("output",)))
    emb = model.tok_embeddings.weight
    assert model.output.weight is emb and model.output.weight_tied and not emb.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["output.lora_A", "output.lora_B"]
    emb_before = emb.clone()
    train_steps(model)
    assert torch.equal(model.tok_embeddings.weight, emb_before)
    with pytest.raises(ValueError, match="tied"):
        model.output.merge_()
    x = tokens()
    with torch.no_grad():
        out = model(x)
        merge_lora(model)
    assert model.output.weight is not model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight, emb_before) and not model.cfg.tie_embeddings
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


def test_merged_tied_model_saves_and_loads_as_untied(tmp_path):
    model = apply_lora(tiny(dtype=torch.float32), LoraConfig(2, 4, targets=("wq", "output")))
    randomise_b(model)
    x = tokens()
    out = model(x)
    save_model(merge_lora(model), tmp_path / "merged")
    loaded = load_model(tmp_path / "merged").eval()
    assert not loaded.cfg.tie_embeddings  # load_model builds float32: same dtype as saved
    assert not torch.equal(loaded.output.weight, loaded.tok_embeddings.weight)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=1e-6)


def test_lora_state_dict_roundtrip_and_strict_errors():
    cfg = LoraConfig(3, 6, targets=("wq", "w2"))
    src = apply_lora(tiny(), cfg)
    randomise_b(src)
    sd = lora_state_dict(src)
    assert set(sd) == {f"layers.{i}.{m}.{ab}" for i in range(2)
                       for m in ("attention.wq", "feed_forward.w2") for ab in ("lora_A", "lora_B")}
    dst = apply_lora(tiny(), cfg)
    load_lora_state_dict(dst, sd)
    x = tokens()
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"missing \['layers.1.feed_forward.w2.lora_B'\]"):
        load_lora_state_dict(dst, {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.lora_B"})
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.attention.wk.lora_A'\]"):
        load_lora_state_dict(dst, {**sd, "layers.0.attention.wk.lora_A": sd["layers.0.attention.wq.lora_A"]})
    wrong_rank = lora_state_dict(apply_lora(tiny(), LoraConfig(4, 6, targets=("wq", "w2"))))
    with pytest.raises(ValueError, match=r"layers.0.attention.wq.lora_A: file \(4, 32\) vs model \(3, 32\)"):
        load_lora_state_dict(dst, wrong_rank)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora_state_dict(tiny(), sd)


def test_adapter_files_roundtrip(tmp_path):
    cfg = LoraConfig(2, 1, dropout=0.1)
    model = apply_lora(tiny(dtype=torch.float32), cfg)
    randomise_b(model)
    out_dir = save_adapter(model, tmp_path / "adapter", base="https://example.org/stories15M.pt", lora_cfg=cfg)
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "llamalit_adapter.json"]
    assert is_adapter_dir(out_dir) and not is_adapter_dir(tmp_path)
    meta_json = json.loads((out_dir / "llamalit_adapter.json").read_text())
    assert meta_json["format"] == "llamalit-lora/2" and meta_json["model"]["dim"] == 32
    loaded_cfg, sd, meta = load_adapter(out_dir)
    assert loaded_cfg == cfg and meta == meta_json
    assert meta["base"] == "https://example.org/stories15M.pt"
    assert set(sd) == set(lora_state_dict(model))
    fresh = apply_lora(tiny(dtype=torch.float32), loaded_cfg)
    load_lora_state_dict(fresh, sd)
    x = tokens()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank=2 alpha=1 dropout=0.1 do not match"):
        save_adapter(model, tmp_path / "bad", base=None, lora_cfg=LoraConfig(4, 1, dropout=0.1))
    with pytest.raises(ValueError, match="targets"):
        save_adapter(model, tmp_path / "bad", base=None, lora_cfg=LoraConfig(2, 1, 0.1, targets=("wq",)))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    (out_dir / "llamalit_adapter.json").write_text('{"format": "llamalit/1"}')
    assert not is_adapter_dir(out_dir)
    with pytest.raises(ValueError, match="not a llamalit adapter config"):
        load_adapter(out_dir)
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(tmp_path / "nowhere")


def test_stories15m_qkvo_adapter_is_about_a_hundred_kb(tmp_path):
    cfg15 = ModelConfig.preset("stories15m")
    qkvo = LoraConfig.from_dict(OmegaConf.load(CONF / "qkvo.yaml"))
    n = adapter_num_params(cfg15, qkvo)
    assert n == 2 * (288 + 288) * 4 * 6 == 27_648
    with torch.device("meta"):
        meta_model = apply_lora(Llama(cfg15), qkvo)
    assert sum(p.numel() for p in meta_model.parameters() if p.requires_grad) == n
    assert sum(p.numel() for p in lora_state_dict(meta_model).values()) == n
    assert adapter_num_params(ModelConfig.preset("tiny"), LoraConfig(3, 1, targets=ALL)) == sum(
        p.numel() for p in lora_state_dict(apply_lora(tiny(), LoraConfig(3, 1, targets=ALL))).values())
    # The file itself: the same tensor shapes in float32, written by save_adapter's code path.
    from llamalit.checkpoints.common import save_tensors
    save_tensors({k: torch.zeros(v.shape) for k, v in lora_state_dict(meta_model).items()},
                 tmp_path / "adapter.safetensors")
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert 4 * n < size < 4 * n + 20_000 < 1_000_000  # ~110 KB vs ~60 MB for the whole model
