"""llama2.c checkpoints: .pt dict, .bin v0/v1/v2 writers byte for byte, readers, round trips, bad files."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from llamalit.checkpoints import load_llama2c, read_llama2c_bin, save_llama2c_bin
from llamalit.checkpoints.llama2c import CheckpointError, llama2c_bin_bytes
from llamalit.inference.generate import generate
from llamalit.model.llama import Llama, ModelConfig

MAGIC = 0x616B3432


def tiny(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", **kw)
    model = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm tensor would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def untie(model: Llama) -> Llama:
    """The same model with a separate (different) classifier."""
    cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "tie_embeddings": False})
    out = Llama(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["output.weight"] = torch.randn_like(sd["tok_embeddings.weight"]) * 0.02
    out.load_state_dict(sd)
    return out


def f32(t: torch.Tensor) -> bytes:
    return np.ascontiguousarray(t.detach().numpy(), dtype="<f4").tobytes()


def layer_list(sd: dict, cfg: ModelConfig, leaf: str) -> list[torch.Tensor]:
    return [sd[f"layers.{i}.{leaf}"] for i in range(cfg.n_layers)]


def expected_v1(model: Llama, shared: bool) -> bytes:
    """FORMATS.md v1, built here independently of the writer."""
    cfg, sd = model.cfg, model.state_dict()
    head = struct.pack("<Ii", MAGIC, 1) + struct.pack(
        "<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
        cfg.max_seq_len) + bytes([int(shared)])
    head += b"\0" * (256 - len(head))
    ts = [*layer_list(sd, cfg, "attention_norm.weight"), *layer_list(sd, cfg, "ffn_norm.weight"),
          sd["norm.weight"], sd["tok_embeddings.weight"]]
    for leaf in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        ts += layer_list(sd, cfg, f"{leaf}.weight")
    if not shared:
        ts.append(sd["output.weight"])
    return head + b"".join(f32(t) for t in ts)


@pytest.mark.parametrize("shared", [True, False])
def test_v1_writer_matches_formats_md_byte_for_byte(tmp_path, shared):
    model = tiny() if shared else untie(tiny())
    path = save_llama2c_bin(model, tmp_path / "m.bin", version=1)
    assert path.read_bytes() == expected_v1(model, shared)


@pytest.mark.parametrize("shared", [True, False])
def test_v0_writer_layout(tmp_path, shared):
    model = tiny(1) if shared else untie(tiny(1))
    cfg, sd = model.cfg, model.state_dict()
    data = save_llama2c_bin(model, tmp_path / "m.bin", version=0).read_bytes()
    vocab = cfg.vocab_size if shared else -cfg.vocab_size
    head = struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab,
                       cfg.max_seq_len)
    body = [sd["tok_embeddings.weight"], *layer_list(sd, cfg, "attention_norm.weight")]
    for leaf in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
        body += layer_list(sd, cfg, f"{leaf}.weight")
    body += layer_list(sd, cfg, "ffn_norm.weight")
    for leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        body += layer_list(sd, cfg, f"{leaf}.weight")
    body.append(sd["norm.weight"])
    before = head + b"".join(f32(t) for t in body)
    assert data[: len(before)] == before
    half = cfg.head_dim // 2
    n_rope = cfg.max_seq_len * half
    rope = np.frombuffer(data, "<f4", count=2 * n_rope, offset=len(before)).reshape(2, cfg.max_seq_len, half)
    freqs = 1.0 / 10000.0 ** (np.arange(0, cfg.head_dim, 2)[:half] / cfg.head_dim)
    angles = np.outer(np.arange(cfg.max_seq_len), freqs)
    np.testing.assert_allclose(rope[0], np.cos(angles), atol=1e-4)
    np.testing.assert_allclose(rope[1], np.sin(angles), atol=1e-4)
    rest = data[len(before) + 8 * n_rope:]
    assert rest == (b"" if shared else f32(sd["output.weight"]))


def test_v2_writer_q80_layout_and_group_size_rule(tmp_path):
    # dim 48: llama2.c halves 64 -> 32 -> 16 until the group size divides dim
    model = tiny(2, dim=48, n_heads=4, n_kv_heads=2, hidden_dim=96)
    cfg, sd = model.cfg, model.state_dict()
    data = save_llama2c_bin(model, tmp_path / "q.bin", version=2).read_bytes()
    magic, version = struct.unpack_from("<Ii", data, 0)
    assert (magic, version) == (MAGIC, 2)
    assert struct.unpack_from("<7i", data, 8) == (48, 96, 2, 4, 2, cfg.vocab_size, cfg.max_seq_len)
    assert data[36] == 1 and struct.unpack_from("<i", data, 37)[0] == 16
    assert data[41:256] == b"\0" * 215
    norms = [*layer_list(sd, cfg, "attention_norm.weight"), *layer_list(sd, cfg, "ffn_norm.weight"),
             sd["norm.weight"]]
    pos = 256 + sum(4 * t.numel() for t in norms)
    assert data[256:pos] == b"".join(f32(t) for t in norms)
    quant = [sd["tok_embeddings.weight"]]
    for leaf in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        quant += layer_list(sd, cfg, f"{leaf}.weight")
    for t in quant:  # int8 values, then that tensor's scales
        w = t.detach().numpy().astype(np.float32).reshape(-1, 16)
        scale = (np.abs(w).max(axis=1) / np.float32(127.0)).astype(np.float32)
        q = np.round(w / scale[:, None]).astype(np.int8)  # numpy rounds half to even, like torch
        n = w.size
        assert data[pos:pos + n] == q.tobytes()
        assert data[pos + n:pos + n + 4 * len(scale)] == scale.astype("<f4").tobytes()
        pos += n + 4 * len(scale)
    assert pos == len(data)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_bin_round_trip_identical(tmp_path, version, shared):
    model = tiny(3) if shared else untie(tiny(3))
    path = save_llama2c_bin(model, tmp_path / "m.bin", version=version)
    back, info = read_llama2c_bin(path)
    assert info["version"] == version and info["shared_classifier"] == shared
    assert back.cfg.tie_embeddings == shared
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert llama2c_bin_bytes(back, version) == path.read_bytes()  # and writes the same bytes again
    x = torch.randint(0, model.cfg.vocab_size, (1, 12))
    assert torch.equal(back(x), model(x))


def test_v2_round_trip_dequantizes_within_half_a_step(tmp_path):
    model = untie(tiny(4))
    path = save_llama2c_bin(model, tmp_path / "q.bin", version=2)
    back = load_llama2c(path)
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        if k.endswith("norm.weight"):
            assert torch.equal(v, ref[k]), k
        else:
            w = ref[k].reshape(-1, 32)
            step = w.abs().max(dim=1).values / 127
            assert ((v.reshape(-1, 32) - w).abs() <= step[:, None] / 2 + 1e-7).all(), k
    again = llama2c_bin_bytes(back, 2)
    assert again[:256] == path.read_bytes()[:256] and len(again) == path.stat().st_size


def test_pt_checkpoint_with_compile_prefix(tmp_path):
    model = tiny(5)
    cfg = model.cfg
    sd = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["_orig_mod.output.weight"] = sd["_orig_mod.tok_embeddings.weight"]  # tied, as llama2.c saves it
    model_args = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                      vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_seq_len,
                      dropout=0.0)
    ckpt = {"model": sd, "model_args": model_args, "optimizer": {"state": {}, "param_groups": []},
            "iter_num": 100, "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 8, "lr": 5e-4}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    back = load_llama2c(tmp_path / "ckpt.pt")
    assert back.cfg.tie_embeddings and back.cfg.hidden_dim == cfg.hidden_dim
    for k, v in back.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_pt_missing_keys_and_shape_mismatch(tmp_path):
    torch.save({"weights": {}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: not a llama2\.c checkpoint"):
        load_llama2c(tmp_path / "a.pt")
    model = tiny()
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, multiple_of=8, max_seq_len=128)
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "b.pt")  # kv heads 4 vs 2
    with pytest.raises(CheckpointError, match=r"b\.pt: shape mismatch for layers\.0\.attention\.wk\.weight"):
        load_llama2c(tmp_path / "b.pt")


def test_bad_bin_files(tmp_path):
    good = save_llama2c_bin(tiny(), tmp_path / "good.bin", version=1).read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.bin: truncated: .* v1 file"):
        load_llama2c(tmp_path / "cut.bin")
    (tmp_path / "v7.bin").write_bytes(good[:4] + struct.pack("<i", 7) + good[8:])
    with pytest.raises(CheckpointError, match="version 7 is not supported"):
        load_llama2c(tmp_path / "v7.bin")
    (tmp_path / "noise.bin").write_bytes(b"this is not a model at all, just text" * 10)
    with pytest.raises(CheckpointError, match=r"noise\.bin: not a llama2\.c \.bin"):
        load_llama2c(tmp_path / "noise.bin")
    v0 = save_llama2c_bin(tiny(), tmp_path / "v0.bin", version=0).read_bytes()
    (tmp_path / "v0cut.bin").write_bytes(v0[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c(tmp_path / "v0cut.bin")
    q = save_llama2c_bin(tiny(), tmp_path / "q.bin", version=2).read_bytes()
    (tmp_path / "qlong.bin").write_bytes(q + b"\0" * 4)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        load_llama2c(tmp_path / "qlong.bin")


def test_writer_refuses_what_the_format_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="rope_theta"):
        save_llama2c_bin(tiny(rope_theta=500000.0), tmp_path / "x.bin")
    with pytest.raises(ValueError, match="version must be 0, 1 or 2"):
        save_llama2c_bin(tiny(), tmp_path / "x.bin", version=3)
    assert not (tmp_path / "x.bin").exists()


# --- llama2.c's own run.c, when its source is given (it is not vendored: LLAMALIT_LLAMA2C_RUN_C=path) ---

def _tokenizer_bin(vocab_size: int) -> bytes:
    """A tokenizer.bin whose piece i prints as "[i]", so run.c's output spells the token ids."""
    pieces = [f"[{i}]".encode() for i in range(vocab_size)]
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    for p in pieces:
        out.append(struct.pack("<fI", 0.0, len(p)) + p)
    return b"".join(out)


@pytest.mark.skipif(not os.environ.get("LLAMALIT_LLAMA2C_RUN_C") or shutil.which("gcc") is None,
                    reason="set LLAMALIT_LLAMA2C_RUN_C to llama2.c's run.c (and have gcc) to run this")
@pytest.mark.parametrize("shared", [True, False])
def test_runc_greedy_tokens_match_ours(tmp_path, shared):
    src = tmp_path / "run.c"
    shutil.copyfile(os.environ["LLAMALIT_LLAMA2C_RUN_C"], src)
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "run"), str(src), "-lm"], check=True)
    model = tiny(6) if shared else untie(tiny(6))
    with torch.no_grad():  # sharper logits than the 0.02 init, so float32 noise cannot flip an argmax
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    save_llama2c_bin(model, tmp_path / "model.bin", version=0)
    (tmp_path / "tok.bin").write_bytes(_tokenizer_bin(model.cfg.vocab_size))
    steps = 24
    res = subprocess.run([str(tmp_path / "run"), str(tmp_path / "model.bin"), "-t", "0", "-n", str(steps),
                          "-z", str(tmp_path / "tok.bin")], capture_output=True, text=True, check=True)
    theirs = [int(i) for i in re.findall(r"\[(\d+)\]", res.stdout)]
    ours = generate(model, [1], steps, temperature=0.0)
    if 1 in ours:  # run.c stops when it samples BOS
        ours = ours[: ours.index(1)]
    assert len(set(ours)) > 3  # a real sequence, not an immediate stop
    assert theirs == ours
