"""llama.cpp itself (llama-cpp-python) loads our GGUF: its logits and greedy tokens equal ours, q8_0 keeps the
perplexity, its tokenizer splits text as ours does, and our LoRA adapter GGUF applies as the merged model.

Models: the demo's shape (stories260K, the trained 512-piece BPE of the fixtures, a few hundred training steps),
a stories15M-shaped model with a 32000-piece vocabulary (the Llama 2 tokenizer cannot be fetched offline: the
fixture's BPE grown to 32000 pieces by merges of its pieces), a Hugging Face Llama (GQA, untied head) and a
llama2.c ``.bin``, each through ``llamalit-export format=gguf``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama.cpp's Python binding is not installed: pip install llama-cpp-python (it builds "
    "llama.cpp from source, several minutes the first time)")

from gguf_checks import (  # noqa: E402
    fresh_copy,
    llama_cpp_greedy,
    llama_cpp_logits,
    load_llama_cpp,
    our_greedy,
    our_logits,
    perplexity,
    rounded,
)

from llamalit.checkpoints import load_checkpoint, save_llama2c_bin  # noqa: E402
from llamalit.checkpoints.gguf import save_gguf  # noqa: E402
from llamalit.cli.export import run_export  # noqa: E402
from llamalit.data.text_formats import read_records  # noqa: E402
from llamalit.data.tokenizer import Tokenizer  # noqa: E402
from llamalit.model import Llama, ModelConfig  # noqa: E402
from llamalit.model.lora import LoraConfig, apply_lora, merge_lora  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Largest |llama.cpp - ours| logit difference allowed, per dtype (llama.cpp with an f32 KV cache; `-s` prints the
# measured ones). Measured 2026-12-03, llama-cpp-python 0.3.36, logits up to ~40: f32 5.7e-6 (demo, HF, .bin) and
# 6.1e-5 (stories15M shape, 32000 vocab), the same arithmetic in another order; f16 3.3e-3 (demo) and 9.5e-3
# (32000 vocab): llama.cpp also rounds the activations it multiplies f16 weights with (our reference holds the
# f16-rounded weights only). Adapter GGUF on the base vs our merged model: 4.4e-6.
LOGIT_TOL = {"f32": 1e-3, "f16": 5e-2}
GREEDY_TOKENS = 24


def stories(corpus: list[Path], shard: int, n: int) -> list[str]:
    return [r["story"] for r in read_records(corpus[shard])][:n]


def token_stream(tok: Tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tok.encode(text, bos=True, eos=True)]


@pytest.fixture(scope="module")
def demo(synthetic_corpus, tiny_tokenizer) -> Llama:
    """The demo's shape trained briefly on the fixture corpus (data01-02), so its predictions mean something."""
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("stories260k", max_seq_len=256))
    ids = torch.tensor(token_stream(tiny_tokenizer, stories(synthetic_corpus, 1, 120) + stories(synthetic_corpus, 2,
                                                                                              120)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 129] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def val_ids(synthetic_corpus, tiny_tokenizer) -> list[int]:
    """Validation text (data00, the split the fixtures hold out), 256 tokens."""
    return token_stream(tiny_tokenizer, stories(synthetic_corpus, 0, 20))[:256]


def grown_tokenizer(tok: Tokenizer, size: int, out: Path) -> Path:
    """``tok``'s SentencePiece BPE grown to ``size`` pieces: each new piece the merge of two earlier ones, scored
    below every earlier merge (a real vocabulary of that size; no 32000-piece one can be fetched offline)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(tok.path).read_bytes())
    normal = [p.piece for p in proto.pieces if p.type == p.NORMAL]
    have, score = {p.piece for p in proto.pieces}, min(p.score for p in proto.pieces)
    for a in normal:
        for b in normal:
            if len(proto.pieces) == size:
                break
            if a + b not in have and not b.startswith("\u2581"):
                score -= 1
                proto.pieces.add(piece=a + b, score=score, type=spm_pb2.ModelProto.SentencePiece.NORMAL)
                have.add(a + b)
    proto.trainer_spec.vocab_size = size
    out.write_bytes(proto.SerializeToString())
    assert Tokenizer(out).vocab_size == size
    return out


def spread(model: Llama, std: float = 0.5) -> Llama:
    """Random weights with a wide output head, so greedy choices are not near-ties that rounding could flip."""
    with torch.no_grad():
        model.output.weight.normal_(0, std)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def check_model(model: Llama, path: Path, ids: list[int], dtype: str) -> float:
    """llama.cpp on ``path`` against ``model``: logits within LOGIT_TOL, the same greedy tokens; the max diff."""
    reference = model if dtype == "f32" else rounded(model, torch.float16 if dtype == "f16" else torch.bfloat16)
    llm = load_llama_cpp(path, model.cfg.max_seq_len)
    theirs, ours = llama_cpp_logits(llm, ids), our_logits(reference, ids)
    diff = float(np.abs(theirs - ours).max())
    print(f"{path.name} ({model.cfg.vocab_size} vocab): max |llama.cpp - ours| = {diff:.2e}")
    assert diff < LOGIT_TOL[dtype], f"{path.name}: max |llama.cpp - ours| = {diff:.2e}"
    prompt = ids[:16]
    assert llama_cpp_greedy(llm, prompt, GREEDY_TOKENS) == our_greedy(reference, prompt, GREEDY_TOKENS)
    return diff


# q8_0 vs f32 perplexity on 256 validation tokens (measured): demo 1.7435 vs 1.7419 (+0.09%), HF 1.7430 vs
# 1.7416, .bin 1.7435 vs 1.7419. The stories15M-shaped model has random weights: its perplexity means nothing
# beyond the ratio (-0.2%).
def q8_perplexity(model: Llama, folder: Path, tokenizer: Path, ids: list[int]) -> tuple[float, float]:
    ppl = {}
    for dtype in ("f32", "q8_0"):
        path = save_gguf(model, folder / f"ppl_{dtype}.gguf", tokenizer, dtype=dtype)
        ppl[dtype] = perplexity(llama_cpp_logits(load_llama_cpp(path, model.cfg.max_seq_len), ids), ids)
    print(f"perplexity ({model.cfg.vocab_size} vocab): f32 {ppl['f32']:.4f}, q8_0 {ppl['q8_0']:.4f}")
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01, ppl
    return ppl["f32"], ppl["q8_0"]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_demo_logits_and_greedy_tokens(demo, val_ids, tiny_tokenizer, tmp_path, dtype):
    check_model(demo, save_gguf(demo, tmp_path / "demo.gguf", tiny_tokenizer.path, dtype=dtype), val_ids, dtype)


def test_demo_q8_0_perplexity_and_tokenizer(demo, val_ids, synthetic_corpus, tiny_tokenizer, tmp_path):
    f32, q8 = q8_perplexity(demo, tmp_path, tiny_tokenizer.path, val_ids)
    assert f32 < 100  # the model learned the corpus (uniform would be 512)
    llm = load_llama_cpp(tmp_path / "ppl_f32.gguf", 256)
    for text in stories(synthetic_corpus, 0, 20):
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == tiny_tokenizer.encode(text, bos=True)
        assert llm.detokenize(tiny_tokenizer.encode(text, bos=False)).decode("utf-8") == " " + text


def test_q_and_k_are_written_in_llama2c_order(demo, val_ids, tiny_tokenizer, tmp_path):
    """llama.cpp's llama architecture rotates adjacent pairs (llama2.c / Meta order): the weights as they are
    match it; the same weights in Hugging Face's rotate-half order do not."""
    from llamalit.checkpoints.hf_layout import permute_to_hf

    hf_order = fresh_copy(demo)
    c = demo.cfg
    with torch.no_grad():
        for layer in hf_order.layers:
            layer.attention.wq.weight.copy_(permute_to_hf(layer.attention.wq.weight, c.n_heads))
            layer.attention.wk.weight.copy_(permute_to_hf(layer.attention.wk.weight, c.n_kv_heads))
    ours = our_logits(demo, val_ids[:64])
    for model, close in ((demo, True), (hf_order, False)):
        path = save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer.path, dtype="f32")
        diff = np.abs(llama_cpp_logits(load_llama_cpp(path, 256), val_ids[:64]) - ours).max()
        print(f"Q/K {'as they are' if close else 'HF-permuted'}: max |llama.cpp - ours| = {diff:.2e}")
        assert (diff < LOGIT_TOL["f32"]) == close, diff


def test_stories15m_shape_with_a_32000_vocabulary(tiny_tokenizer, synthetic_corpus, tmp_path):
    tok = Tokenizer(grown_tokenizer(tiny_tokenizer, 32000, tmp_path / "tok32k.model"))
    torch.manual_seed(1)
    model = spread(Llama(ModelConfig.preset("stories15m")))
    ids = token_stream(tok, stories(synthetic_corpus, 0, 20))[:128]
    assert max(ids) >= 512  # the grown pieces are in use
    for dtype in ("f32", "f16"):
        check_model(model, save_gguf(model, tmp_path / f"{dtype}.gguf", tok.path, dtype=dtype), ids, dtype)
    llm = load_llama_cpp(tmp_path / "f32.gguf", 256)
    text = stories(synthetic_corpus, 0, 1)[0]
    assert llm.tokenize(text.encode("utf-8"), add_bos=True) == tok.encode(text, bos=True)
    q8_perplexity(model, tmp_path, tok.path, ids)


def test_hugging_face_gqa_untied_head_through_the_cli(demo, tiny_tokenizer, val_ids, tmp_path):
    """A ``LlamaForCausalLM`` saved by transformers itself: the trained demo's weights (GQA: 8 heads, 4 kv heads)
    with a head of its own (untied: the demo's plus noise)."""
    import transformers

    from llamalit.checkpoints.hf_layout import hf_config_dict, to_hf_state_dict

    untied = replace(demo.cfg, tie_embeddings=False)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(untied))).eval()
    sd = to_hf_state_dict(demo.state_dict(), untied)
    torch.manual_seed(5)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 0.02 * torch.randn_like(sd["lm_head.weight"])
    hf.load_state_dict(sd)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(Path(tiny_tokenizer.path).read_bytes())
    model = load_checkpoint(src).eval()
    assert not model.cfg.tie_embeddings and (model.cfg.n_heads, model.cfg.n_kv_heads) == (8, 4)
    with torch.no_grad():  # our import equals transformers' own model
        np.testing.assert_allclose(our_logits(model, val_ids[:32]), hf(torch.tensor([val_ids[:32]])).logits[0],
                                   atol=1e-4)
    for dtype in ("f32", "f16"):
        [path] = run_export({"ckpt": str(src), "format": "gguf", "out": str(tmp_path / f"{dtype}.gguf"),
                             "dtype": dtype})
        check_model(model, path, val_ids, dtype)
    q8_perplexity(model, tmp_path, tiny_tokenizer.path, val_ids)


def test_llama2c_bin_through_the_cli(demo, tiny_tokenizer, val_ids, tmp_path):
    """The trained demo as a llama2.c v0 ``.bin`` (no tokenizer inside: ``tokenizer=`` names it)."""
    src = save_llama2c_bin(demo, tmp_path / "model.bin", 0)
    model = load_checkpoint(src).eval()
    for dtype in ("f32", "f16"):
        [path] = run_export({"ckpt": str(src), "format": "gguf", "out": str(tmp_path / f"{dtype}.gguf"),
                             "dtype": dtype, "tokenizer": str(tiny_tokenizer.path)})
        check_model(model, path, val_ids, dtype)
    q8_perplexity(model, tmp_path, tiny_tokenizer.path, val_ids)


def test_adapter_gguf_applied_by_llama_cpp_equals_our_merged_model(demo, val_ids, tiny_tokenizer, tmp_path):
    """Through the CLI: the base dir to a GGUF, our adapter dir (``adapter=true``) to llama.cpp's adapter GGUF; and
    ``adapter=false`` (the default) to one merged GGUF. Both equal our merged model in llama.cpp."""
    from llamalit.checkpoints import save_model
    from llamalit.checkpoints.adapter import save_adapter

    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w2"))
    save_model(demo, tmp_path / "base", files={"tokenizer.model": tiny_tokenizer.path})
    lora = apply_lora(fresh_copy(demo), lora_cfg)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_adapter(lora, tmp_path / "adapter", base=str(tmp_path / "base"), lora_cfg=lora_cfg)
    export = {"format": "gguf", "dtype": "f32"}
    [base] = run_export({**export, "ckpt": str(tmp_path / "base"), "out": str(tmp_path / "base.gguf")})
    [adapter] = run_export({**export, "ckpt": str(tmp_path / "adapter"), "out": str(tmp_path / "a.gguf"),
                            "adapter": True})
    [whole] = run_export({**export, "ckpt": str(tmp_path / "adapter"), "out": str(tmp_path / "merged.gguf")})
    merged = merge_lora(lora).eval()
    ids = val_ids[:96]
    ours = our_logits(merged, ids)
    theirs = llama_cpp_logits(load_llama_cpp(base, 256, lora=adapter), ids)
    diff = float(np.abs(theirs - ours).max())
    print(f"adapter: max |llama.cpp (base + adapter GGUF) - ours (merged)| = {diff:.2e}")
    assert diff < LOGIT_TOL["f32"], diff
    assert np.abs(theirs - our_logits(demo, ids)).max() > 100 * LOGIT_TOL["f32"]  # the adapter did change them
    assert np.abs(llama_cpp_logits(load_llama_cpp(whole, 256), ids) - ours).max() < LOGIT_TOL["f32"]
