"""Loading Hugging Face Llamas the way big ones need: sharded, meta-built, straight into the target dtype."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hf_models import random_hf_llama

from llamalit.checkpoints import find_tokenizer, load_checkpoint, load_hf
from llamalit.checkpoints.llama2c import CheckpointError

transformers = pytest.importorskip("transformers")


def hf_model(tie: bool = False, seed: int = 0, **kw):
    """A tiny transformers Llama: GQA 4/2, vocab 1000, rope_theta 500000, untied unless asked."""
    return random_hf_llama(seed, lm_head_std=0.05, **{
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 96,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tie, **kw})


def spm_tokenizer(path):
    spm = pytest.importorskip("sentencepiece")
    words = "the cat sat on a mat and the dog ran to the big red ball in the sun".split()
    text = path.with_suffix(".txt")
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    hf = hf_model()
    hf.save_pretrained(d, max_shard_size="60KB")
    spm_tokenizer(d / "tokenizer.model")
    return d, hf


def test_sharded_untied_gqa_vocab1000_equal_logits_float32_and_float64(sharded):
    d, hf = sharded
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 2
    model = load_hf(d).eval()
    c = model.cfg
    assert (c.vocab_size, c.n_kv_heads, c.tie_embeddings, c.rope_theta, c.norm_eps, c.max_seq_len) == \
        (1000, 2, False, 500000.0, 1e-5, 96)
    assert model.output.weight is not model.tok_embeddings.weight
    tokens = torch.randint(0, 1000, (2, 90))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)
        m64 = load_hf(d, dtype=torch.float64).eval()
        assert {p.dtype for p in m64.parameters()} == {torch.float64}
        # 20x tighter than float32; not 1e-12: both sides build RoPE cos/sin in float32 (as HF does),
        # with float32 rounding that differs by an ulp here and there
        torch.testing.assert_close(m64(tokens), hf.double()(tokens).logits, atol=1e-6, rtol=0)
        hf.float()
    assert find_tokenizer(d) == d / "tokenizer.model"
    same = load_checkpoint(d)  # the format detection route reads the same weights
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))


def test_bf16_load_is_the_rounded_float32_model(sharded):
    d, _ = sharded
    ref = load_hf(d)
    model = load_hf(d, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    assert model.freqs_cos.dtype == torch.float32 and torch.equal(model.freqs_cos, ref.freqs_cos)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    with torch.no_grad():
        tokens = torch.randint(0, 1000, (1, 16))
        assert (model(tokens).float() - ref(tokens)).abs().max() < 0.1


def test_tied_head_shares_the_embedding_parameter(tmp_path):
    hf = hf_model(tie=True, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    model = load_hf(tmp_path, dtype=torch.float32).eval()
    assert model.cfg.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(list(hf.parameters()))
    tokens = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


def test_bin_shards_and_errors(tmp_path):
    hf = hf_model(seed=2)
    sd = hf.state_dict()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        torch.save({n: sd[n].clone() for n in part}, tmp_path / f"pytorch_model-{i}.bin")
        weight_map.update({n: f"pytorch_model-{i}.bin" for n in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.config.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype=torch.bfloat16).eval()
    assert model.layers[1].attention.wk.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)

    (tmp_path / "pytorch_model-1.bin").unlink()
    with pytest.raises(CheckpointError, match=r"shard files missing: \['pytorch_model-1.bin'\]"):
        load_hf(tmp_path)
    torch.save({n: sd[n] for n in names[1::2]}, tmp_path / "pytorch_model-1.bin")
    head_shard = tmp_path / weight_map["lm_head.weight"]
    torch.save({n: t for n, t in torch.load(head_shard, weights_only=True).items() if n != "lm_head.weight"},
               head_shard)
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false but lm_head.weight is missing"):
        load_hf(tmp_path)


def test_shape_mismatch_is_found_from_headers_before_reading(tmp_path, monkeypatch):
    hf_model(seed=3).save_pretrained(tmp_path, max_shard_size="60KB")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 999}))
    import llamalit.checkpoints.hf as hf_mod

    reads = []  # tensors the loader reads (safe_open is a Rust type: count them at the loader's iterator)
    real = hf_mod._iter_hf_tensors
    monkeypatch.setattr(hf_mod, "_iter_hf_tensors", lambda p: (reads.append(x[1]) or x for x in real(p)))
    with pytest.raises(CheckpointError, match=r"shape mismatch for tok_embeddings.weight \(model.embed_tokens"
                                              r".weight in model-\d+-of-\d+.safetensors\): file has \(1000, 64\)"):
        load_hf(tmp_path)
    assert reads == []


MEASURE = textwrap.dedent("""
    import json, sys, torch
    from llamalit.checkpoints.hf import load_hf

    def status():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(d[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon")}

    load_hf(sys.argv[2], dtype=torch.bfloat16)  # warm up: lazy imports, allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM)
    before = status()
    model = load_hf(sys.argv[1], dtype=torch.bfloat16)
    after = status()
    print(json.dumps({k: after[k] - before[k] for k in after}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bf16_load_of_float32_shards_peaks_near_one_bf16_copy(tmp_path):
    """~48 MB of float32 shards loaded as bfloat16 (~24 MB): RSS grows by the bf16 model, the peak
    stays below bf16 model + half the float32 file, so no full float32 copy ever existed."""
    big = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = transformers.LlamaForCausalLM(big).state_dict()
    from safetensors.torch import save_file
    names, weight_map = sorted(shapes), {}
    for i in range(4):
        fn = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({n: torch.randn(shapes[n].shape) * 0.02 for n in names[i::4]}, str(tmp_path / fn))
        weight_map.update({n: fn for n in names[i::4]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    big.save_pretrained(tmp_path)
    hf_model(seed=4).save_pretrained(tmp_path / "small")
    fp32_bytes = sum(t.numel() * 4 for t in shapes.values())
    bf16_bytes = fp32_bytes // 2
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), str(tmp_path / "small")],
                         capture_output=True, text=True, check=True)
    grew = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.9 * bf16_bytes < grew["RssAnon"] < 1.25 * bf16_bytes, (grew, bf16_bytes)
    assert grew["VmHWM"] < bf16_bytes + fp32_bytes // 2, (grew, bf16_bytes)
