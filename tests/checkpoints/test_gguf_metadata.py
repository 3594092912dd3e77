"""GGUF export read back with the ``gguf`` package's own reader (no llama.cpp needed): the llama metadata, the
SentencePiece vocabulary, tensor names, types and values, the adapter GGUF, and the CLI's bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="format=gguf needs the gguf package: pip install gguf")

from llamalit.checkpoints import save_hf, save_model  # noqa: E402
from llamalit.checkpoints.gguf import GGUFError, read_gguf_metadata, save_gguf, save_gguf_adapter  # noqa: E402
from llamalit.cli.export import run_export  # noqa: E402
from llamalit.model import Llama, ModelConfig  # noqa: E402
from llamalit.model.lora import LoraConfig, apply_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
Q = gguf.GGMLQuantizationType


def demo_model(seed: int = 0, **overrides) -> Llama:
    """The demo's shape (stories260K: dim 64, 5 layers, 8 heads, 4 kv heads, vocab 512), random weights."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig.preset("stories260k", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_llama_metadata_vocab_and_f32_tensors(tmp_path, tiny_tokenizer):
    model = demo_model()
    path = save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer.path, dtype="f32")
    meta, cfg = read_gguf_metadata(path), model.cfg
    assert {k: meta[k] for k in meta if k.startswith(("general.", "llama."))} == {
        "general.architecture": "llama", "general.type": "model", "general.name": "m",
        "llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim, "llama.rope.freq_base": cfg.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps), "llama.vocab_size": 512,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "general.quantization_version": gguf.GGML_QUANT_VERSION}
    sp = tiny_tokenizer.sp
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.add_bos_token"]) == \
        ("llama", sp.bos_id(), sp.eos_id(), sp.unk_id(), True)
    fields = gguf.GGUFReader(str(path)).fields
    pieces = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    assert pieces == [sp.IdToPiece(i) for i in range(512)]
    assert scores == pytest.approx([sp.GetScore(i) for i in range(512)])
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert types[sp.PieceToId("<0x0A>")] == gguf.TokenType.BYTE and types[300] == gguf.TokenType.NORMAL
    found = tensors(path)
    assert "output.weight" not in found  # tied: llama.cpp reuses token_embd.weight for the head
    assert len(found) == 2 + 9 * cfg.n_layers
    sd = model.state_dict()
    for key, name in [("tok_embeddings.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
                      ("layers.2.attention.wq.weight", "blk.2.attn_q.weight"),  # as they are: no HF permutation
                      ("layers.2.attention.wk.weight", "blk.2.attn_k.weight"),
                      ("layers.4.feed_forward.w1.weight", "blk.4.ffn_gate.weight"),
                      ("layers.4.feed_forward.w2.weight", "blk.4.ffn_down.weight"),
                      ("layers.0.ffn_norm.weight", "blk.0.ffn_norm.weight")]:
        t = found[name]
        assert t.tensor_type == Q.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(sd[key].shape), sd[key].numpy())


def test_untied_head_f16_bf16_and_q8_0_types(tmp_path, tiny_tokenizer, capsys):
    model = demo_model(tie_embeddings=False)
    for dtype, qtype in [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)]:
        found = tensors(save_gguf(model, tmp_path / f"{dtype}.gguf", tiny_tokenizer.path, dtype=dtype))
        assert found["output.weight"].tensor_type == qtype and found["blk.0.attn_q.weight"].tensor_type == qtype
        assert found["blk.0.attn_norm.weight"].tensor_type == Q.F32  # 1-D tensors stay f32, as llama.cpp wants
        # rows of hidden_dim=172 are not whole Q8_0 blocks (32): f16, as convert_hf_to_gguf.py falls back
        assert found["blk.0.ffn_down.weight"].tensor_type == (Q.F16 if dtype == "q8_0" else qtype)
    assert "blk.0.ffn_down.weight and 4 more: rows of [172] are not whole q8_0 blocks" in capsys.readouterr().err
    f16 = tensors(tmp_path / "f16.gguf")["output.weight"]
    np.testing.assert_allclose(np.asarray(f16.data).reshape(512, 64), model.output.weight.detach().numpy(),
                               atol=1e-3)


def test_vocab_padding_chat_template_and_cli(tmp_path, tiny_tokenizer):
    model = demo_model(vocab_size=520)  # 8 more rows than pieces: [PADn], unused, as llama.cpp's converter pads
    src = tmp_path / "run"
    save_model(model, src, files={"tokenizer.model": tiny_tokenizer.path})
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    out = run_export({"ckpt": str(src), "format": "gguf", "out": str(tmp_path / "out"), "dtype": "q8_0"})
    assert out == [tmp_path / "out" / "model.gguf"]
    fields = gguf.GGUFReader(str(out[0])).fields
    assert fields["tokenizer.ggml.tokens"].contents()[-2:] == ["[PAD518]", "[PAD519]"]
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.chat_template"].contents() == template
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_adapter_gguf(tmp_path):
    model = apply_lora(demo_model(), LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2")))
    path = save_gguf_adapter(model, tmp_path / "a.gguf")
    meta = read_gguf_metadata(path)
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) \
        == ("llama", "adapter", "lora", 8.0)
    found = tensors(path)
    assert len(found) == 2 * 3 * 5
    a, b = found["blk.3.ffn_down.weight.lora_a"], found["blk.3.ffn_down.weight.lora_b"]
    layer = model.layers[3].feed_forward.w2
    np.testing.assert_array_equal(np.asarray(a.data).reshape(4, 172), layer.lora_A.detach().numpy())
    np.testing.assert_array_equal(np.asarray(b.data).reshape(64, 4), layer.lora_B.detach().numpy())


def test_what_llama_cpp_cannot_hold_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(GGUFError, match="tokenizer .* has 512 pieces but the model's vocab_size is 300"):
        save_gguf(demo_model(vocab_size=300), tmp_path / "x.gguf", tiny_tokenizer.path)
    head = apply_lora(demo_model(), LoraConfig(rank=2, alpha=1.0, targets=("wq", "output")))
    with pytest.raises(GGUFError, match="trains the output head, which this model ties to the token embedding"):
        save_gguf_adapter(head, tmp_path / "a.gguf")
    with pytest.raises(GGUFError, match="holds LoRA adapters"):
        save_gguf(head, tmp_path / "x.gguf", tiny_tokenizer.path)
    assert not list(tmp_path.iterdir())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # three export.py processes
def test_cli_errors_are_one_line(tmp_path, tiny_tokenizer):
    src = tmp_path / "hf"
    save_hf(demo_model(), src, tokenizer=tiny_tokenizer.path)
    bad_dtype = run_cli(f"ckpt={src}", "format=gguf", f"out={tmp_path}/m.gguf", "dtype=q4_k")
    assert bad_dtype.returncode == 1
    assert bad_dtype.stderr.splitlines()[0] == \
        "error: dtype='q4_k': format=gguf writes one of ['f32', 'f16', 'bf16', 'q8_0'] (f16 by default)"
    tied_head = tmp_path / "lora"
    model = apply_lora(demo_model(), LoraConfig(rank=2, alpha=1.0, targets=("output",)))
    from llamalit.checkpoints.adapter import save_adapter

    save_adapter(model, tied_head, base=str(src), lora_cfg=LoraConfig(rank=2, alpha=1.0, targets=("output",)))
    refused = run_cli(f"ckpt={tied_head}", "format=gguf", f"out={tmp_path}/a.gguf", "adapter=true")
    assert refused.returncode == 1 and refused.stderr.startswith("error: the adapter trains the output head")
    merged = run_cli(f"ckpt={tied_head}", "format=gguf", f"out={tmp_path}/m.gguf")  # merged: an untied head
    assert merged.returncode == 0, merged.stderr
    assert "output.weight" in tensors(tmp_path / "m.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_recorded_prompt_format_becomes_the_chat_template(tmp_path, tiny_tokenizer):
    """A run that recorded ``llama2_chat`` (inference.templates) gets its Jinja in ``tokenizer.chat_template``;
    ``instruct_stories`` has no Jinja form (its prompts are shortened in Python) and gets none."""
    from llamalit.inference.jinja_templates import LLAMA2_CHAT

    for template, expected in (("llama2_chat", LLAMA2_CHAT), ("instruct_stories", None)):
        src = tmp_path / template
        save_model(demo_model(), src, extra={"template": template}, files={"tokenizer.model": tiny_tokenizer.path})
        [out] = run_export({"ckpt": str(src), "format": "gguf", "out": str(tmp_path / f"{template}.gguf")})
        field = gguf.GGUFReader(str(out)).fields.get("tokenizer.chat_template")
        assert (field.contents() if field else None) == expected
