"""generate.py streams what greedy generation produces; export.py writes every format and they load back."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalit.checkpoints import find_tokenizer, load_checkpoint, load_hf, read_llama2c_bin, save_model
from llamalit.checkpoints.adapter import save_adapter
from llamalit.cli.export import run_export
from llamalit.cli.generate import run_generate
from llamalit.data.tokenizer import Tokenizer, read_llama2c_tokenizer_bin, train_tokenizer
from llamalit.inference.generate import generate
from llamalit.inference.streaming import StreamDecoder
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ("once upon a time there was a little cat who liked to play in the sun with her red ball "
             "one day the dog came and they ran to the big tree café naïve").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(400)]
    return train_tokenizer(lines, VOCAB, tmp_path_factory.mktemp("tok") / "tok.model", num_threads=1)


def tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ModelConfig.preset("tiny", vocab_size=VOCAB)).eval()
    with torch.no_grad():  # peaked logits: greedy decoding is not decided by float noise
        model.tok_embeddings.weight.mul_(20)
    return model


def same_weights(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stream_decoder_holds_back_partial_utf8(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "the cat 日本 🙂 ran"
    ids = tok.encode(text, bos=True)
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback really happens
    stream = StreamDecoder(tok, ids[:3])
    pieces = [stream.push(i) for i in ids[3:]]
    out = tok.decode(ids[:3]) + "".join(pieces) + stream.flush()
    assert out == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 3  # emitted piece by piece, not all at the end


def test_generate_cli_streams_greedy_text(tmp_path, tokenizer_path):
    model = tiny(1)
    tok = Tokenizer(tokenizer_path)
    save_model(model, tmp_path / "run", extra={"tokenizer": str(tokenizer_path)})
    prompt_ids = tok.encode("the cat", bos=True)
    new = generate(model, prompt_ids, 12, temperature=0.0, eos_id=tok.eos_id)
    res = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), f"ckpt={tmp_path / 'run'}", "prompt=the cat",
         "max_new_tokens=12", "temperature=0", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == tok.decode(prompt_ids + new) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # Hydra left no outputs/ or .log behind


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_run_generate_streams_and_is_seeded(tmp_path, tokenizer_path):
    model = tiny(2)
    save_model(model, tmp_path / "run")
    cfg = {"ckpt": str(tmp_path / "run"), "prompt": "once upon", "max_new_tokens": 20, "temperature": 1.0,
           "top_k": 50, "top_p": 0.9, "seed": 7, "tokenizer": str(tokenizer_path), "device": "cpu",
           "stop_at_eos": False}
    a, b = Recorder(), Recorder()
    ids_a, ids_b = run_generate(cfg, a), run_generate(cfg, b)
    assert ids_a == ids_b and len(ids_a) == 20
    assert a.getvalue() == b.getvalue()
    assert len([w for w in a.writes if w]) > 5
    with pytest.raises(FileNotFoundError, match="pass tokenizer=PATH"):
        run_generate({**cfg, "tokenizer": None}, Recorder())


def test_export_cli_llama2c_writes_bin_and_tokenizer(tmp_path, tokenizer_path):
    model = tiny(3)
    save_model(model, tmp_path / "run", extra={"tokenizer": str(tokenizer_path)})
    out = tmp_path / "export" / "model.bin"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), f"ckpt={tmp_path / 'run'}", "format=llama2c",
         f"out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    back, info = read_llama2c_bin(out)
    assert info["version"] == 0 and same_weights(back, model)
    max_len, entries = read_llama2c_tokenizer_bin(out.with_name("tokenizer.bin"), VOCAB)
    assert len(entries) == VOCAB and entries[1][1] == b"\n<s>\n"
    # and the SentencePiece model beside it, so generate.py/evaluate.py run on the .bin with no tokenizer=
    assert find_tokenizer(out) == out.with_name("tokenizer.model")
    assert out.with_name("tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_export_every_format(tmp_path, tokenizer_path):
    base = tiny(4)
    save_model(base, tmp_path / "base", extra={"tokenizer": str(tokenizer_path)})
    lora = apply_lora(tiny(4), LoraConfig(rank=2, alpha=4.0, targets=("wq", "wk", "wv", "wo")))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    lora.eval()
    save_adapter(lora, tmp_path / "adapter", base=str(tmp_path / "base"), lora_cfg=LoraConfig(2, 4.0))
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        want = lora(tokens)

    def export(ckpt, fmt):
        out = tmp_path / fmt
        run_export({"ckpt": str(ckpt), "format": fmt, "out": str(out), "tokenizer": str(tokenizer_path)})
        return out

    for fmt, version in [("llama2c_v1", 1), ("llama2c_q8", 2)]:
        back, info = read_llama2c_bin(export(tmp_path / "base", fmt) / "model.bin")
        assert info["version"] == version
        if version == 1:
            assert same_weights(back, base)
    hf_dir = export(tmp_path / "base", "hf")
    assert same_weights(load_hf(hf_dir), base) and (hf_dir / "tokenizer.model").is_file()
    merged = load_checkpoint(export(tmp_path / "adapter", "merged"))
    peft_dir = export(tmp_path / "adapter", "peft")
    from_peft = load_checkpoint(peft_dir)  # base from peft/base (HF), adapter merged on load
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(from_peft(tokens), want, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    assert find_tokenizer(peft_dir) == peft_dir / "base" / "tokenizer.model"  # an adapter finds its base's
    assert find_tokenizer(tmp_path / "adapter") == tokenizer_path  # ours too: base/config.json names it
    with pytest.raises(ValueError, match="format='onnx'"):
        run_export({"ckpt": str(tmp_path / "base"), "format": "onnx", "out": str(tmp_path / "x")})
