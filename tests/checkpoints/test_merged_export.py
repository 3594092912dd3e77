"""export_merged_hf: an adapter folded into a fresh reload of its base, saved as a directory transformers reads."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import random_hf_llama

from llamalit.checkpoints import CheckpointError, load_hf
from llamalit.checkpoints.merged import export_merged_hf
from llamalit.model.lora import LoraConfig, apply_lora, lora_layers, lora_state_dict

transformers = pytest.importorskip("transformers")

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
BLOCK = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny transformers Llama (GQA 4/2, untied, rope_theta 500000; widths multiples of 64 for 4-bit on CPU)."""
    model = random_hf_llama(
        0, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("base") / "llama"
    model.save_pretrained(d, max_shard_size="100KB")
    (d / "tokenizer.model").write_bytes(b"not a real sentencepiece model, copied as is")
    return d


def trained_like(model, seed: int = 3) -> None:
    """Adapter values as after training: A and B both non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, dtype) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens()).logits


def test_float32_export_loads_in_transformers_with_the_lora_models_logits(base_dir, tmp_path):
    cfg = LoraConfig(4, 8.0, targets=ALL)
    model = apply_lora(load_hf(base_dir).eval(), cfg)
    trained_like(model)
    with torch.no_grad():
        want = model(tokens())
        base_logits = load_hf(base_dir).eval()(tokens())
    assert (want - base_logits).abs().max() > 0.1  # the adapter matters: equality below is not trivial

    out = export_merged_hf(base_dir, lora_state_dict(model), cfg, tmp_path / "merged", dtype=torch.float32)
    assert out == tmp_path / "merged"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                              "tokenizer.model", "tokenizer_config.json"}
    assert (out / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp directory left beside it
    torch.testing.assert_close(hf_logits(out, torch.float32), want, atol=1e-4, rtol=1e-4)

    trained_like(model, seed=4)  # a second export replaces the first one
    export_merged_hf(base_dir, lora_state_dict(model), cfg, out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, torch.float32), model(tokens()), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_bf16_export_is_bf16_and_close_to_the_float32_lora_model(base_dir, tmp_path):
    cfg = LoraConfig(8, 16.0, targets=BLOCK)
    model = apply_lora(load_hf(base_dir).eval(), cfg)
    trained_like(model)
    out = export_merged_hf(base_dir, lora_state_dict(model), cfg, tmp_path / "m")  # dtype default: bf16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with torch.no_grad():
        want = model(tokens())
        base_logits = load_hf(base_dir).eval()(tokens())
    got = hf_logits(out, torch.bfloat16).float()
    tol = 0.05 * want.abs().max()  # bf16 weights and matmuls: ~2% here
    assert (got - want).abs().max() < tol < (base_logits - want).abs().max(), float((got - want).abs().max())


def test_a_qlora_adapter_is_merged_into_the_bf16_base_not_the_4bit_one(base_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from llamalit.model.quantize import quantize_linears

    cfg = LoraConfig(4, 8.0, dropout=0.1, targets=BLOCK)
    qmodel = apply_lora(quantize_linears(load_hf(base_dir, dtype=torch.bfloat16), device="cpu"), cfg)
    qmodel.train()
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(5)
    for _ in range(3):  # QLoRA training on the CPU
        opt.zero_grad()
        qmodel.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    adapter = lora_state_dict(qmodel)
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16} and all(t.any() for t in adapter.values())

    out = export_merged_hf(base_dir, adapter, cfg, tmp_path / "merged")
    merged = load_hf(out, dtype=torch.bfloat16)
    bf16_base = load_hf(base_dir, dtype=torch.bfloat16)
    for name, layer in lora_layers(qmodel).items():
        delta = (adapter[f"{name}.lora_B"] @ adapter[f"{name}.lora_A"]) * cfg.scaling
        w = merged.get_submodule(name).weight
        assert torch.equal(w, bf16_base.get_submodule(name).weight + delta), name  # bf16 base + B@A*alpha/r
        four_bit = bnb.functional.dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state)
        assert (w.float() - (four_bit.float() + delta.float())).abs().max() > 1e-3, name  # not the 4-bit weights
    for name in ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(merged.get_parameter(name), bf16_base.get_parameter(name)), name
    qmodel.eval()
    with torch.no_grad():  # the merged model computes what the QLoRA model did, up to 4-bit vs bf16 base
        diff = (merged.eval()(x).float() - qmodel(x).float()).abs().max()
    assert diff < 0.2, float(diff)


def test_a_mismatched_adapter_or_a_foreign_directory_is_refused_and_nothing_is_written(base_dir, tmp_path):
    cfg = LoraConfig(4, 8.0, targets=("wq", "wv"))
    adapter = lora_state_dict(apply_lora(load_hf(base_dir), cfg))
    with pytest.raises(CheckpointError, match=r"does not fit base .*rank=8.*shape mismatches .*lora_A: file "
                                              r"\(4, 64\) vs model \(8, 64\)"):
        export_merged_hf(base_dir, adapter, LoraConfig(8, 8.0, targets=("wq", "wv")), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="run exists and is not an earlier Hugging Face export"):
        export_merged_hf(base_dir, adapter, cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["summary.json"]
