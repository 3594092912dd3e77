"""Hugging Face Llama: our export loads in transformers with equal logits; transformers' files load in ours."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import random_hf_llama

from llamalit.checkpoints import CheckpointError, load_hf, save_hf
from llamalit.model.llama import Llama, ModelConfig

transformers = pytest.importorskip("transformers")


def tiny(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ModelConfig.preset("tiny", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(path, tokens):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("kw", [
    dict(),                                                          # tied, GQA 4/2
    dict(tie_embeddings=False, n_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6),
    dict(n_kv_heads=4, hidden_dim=40),
])
def test_export_equal_logits_in_transformers_and_round_trip(tmp_path, kw):
    model = tiny(1, **kw)
    if not model.cfg.tie_embeddings:
        with torch.no_grad():
            model.output.weight.normal_(0, 0.05)
    save_hf(model, tmp_path)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(tmp_path, tokens), ours, atol=2e-5, rtol=1e-4)
    back = load_hf(tmp_path)
    shape = lambda c: {k: v for k, v in c.to_dict().items() if k != "multiple_of"}  # noqa: E731
    assert shape(back.cfg) == shape(model.cfg)  # multiple_of only matters when hidden_dim is derived
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_rope_theta_matters(tmp_path):
    # guards the test above: a wrong rope_theta in config.json would change transformers' logits
    model = tiny(2, rope_theta=500.0)
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (hf_logits(tmp_path, tokens) - model(tokens)).abs().max() > 1e-4


def test_sharded_untied_gqa_checkpoint_from_transformers(tmp_path):
    hf = random_hf_llama(
        3, vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=20000.0,
        tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_hf(tmp_path)
    assert (model.cfg.n_kv_heads, model.cfg.tie_embeddings, model.cfg.rope_theta) == (2, False, 20000.0)
    tokens = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


def test_tokenizer_file_is_copied(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "corpus.txt"
    words = "the cat sat on a mat and the dog ran to the big red ball in the sun".split()
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    model = tiny(4, vocab_size=60)
    out = save_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tok.model")
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert tok("the cat sat").input_ids == [sp.bos_id(), *sp.encode("the cat sat")]


def test_bad_hf_dirs(tmp_path):
    model = tiny(5)
    save_hf(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"a: shape mismatch for layers\.0\.feed_forward\.w1\.weight"):
        load_hf(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn",
                                                                                     "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="unsupported Llama variant: rope_scaling"):
        load_hf(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_hf(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="merge them first"):
        from llamalit.model.lora import LoraConfig, apply_lora

        save_hf(apply_lora(tiny(), LoraConfig(2, 4.0)), tmp_path / "b")
