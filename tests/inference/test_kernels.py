"""The compiled CPU decode kernel: products, the whole step, the switch, and the fallback."""

from __future__ import annotations

import copy
import logging
import os
import time

import pytest
import torch
from attentive_llamas import attentive_llama

from llamalit.inference import kernels
from llamalit.inference.decode import decode_step, decode_weights
from llamalit.inference.engine import _SlotCache
from llamalit.inference.generate import generate
from llamalit.inference.kernels import build_decode_kernel, gemv, load_decode_kernel, pack_rows
from llamalit.model.llama import Llama


@pytest.fixture
def fresh_loader():
    """load_decode_kernel forgets its cached result before and after the test."""
    load_decode_kernel.cache_clear()
    yield
    load_decode_kernel.cache_clear()


def _model(n_heads: int = 4, n_kv_heads: int = 2, tie: bool = True, dim: int = 32) -> Llama:
    return attentive_llama(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=97,
                           multiple_of=8, max_seq_len=64, tie_embeddings=tie)


def test_pack_rows_layout() -> None:
    w = torch.arange(70 * 3, dtype=torch.float32).view(70, 3)
    packed = pack_rows(w)
    assert packed.shape == (2, 3, kernels.PANEL)
    assert torch.equal(packed[0, :, 5], w[5]) and torch.equal(packed[1, :, 69 - 64], w[69])
    assert not packed[1, :, 6:].any()  # rows past 70 are zero padding


@pytest.mark.parametrize("rows, n, batch", [(1, 1, 1), (70, 33, 3), (200, 288, 1), (1100, 1000, 2), (48, 97, 11)])
def test_gemv_matches_float64(lib, rows: int, n: int, batch: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(rows, n, generator=g), torch.randn(batch, n, generator=g)
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T  # the size of the terms summed
    got = gemv(x, pack_rows(w), rows)
    assert got.shape == (batch, rows)
    assert ((got.double() - exact).abs() <= 1e-6 * scale + 1e-7).all()  # fp32 rounding only
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5 * float(scale.max()))


@pytest.mark.parametrize("rows", [16, 32, 48, 64, 70, 200])  # strips of 1-4 vectors: batch blocks of 8, 4, 2
def test_gemv_row_of_a_batch_equals_the_row_alone(lib, rows: int) -> None:
    """Batch rows go through the weights in blocks (one load for several rows); each row must still come out
    bit for bit as it does alone, so a request's tokens do not depend on who shares its decode step."""
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(rows, 101, generator=g), torch.randn(11, 101, generator=g)
    packed = pack_rows(w)
    together = gemv(x, packed, rows)
    for b in range(11):
        assert torch.equal(together[b], gemv(x[b:b + 1], packed, rows)[0]), b


def test_gemv_threads_agree(lib) -> None:
    """1100 x 1000 is large enough to be split over threads; the split must not change a value."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(1100, 1000, generator=g), torch.randn(1, 1000, generator=g)
    packed, old = pack_rows(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv(x, packed, 1100)
        torch.set_num_threads(2)
        assert torch.equal(gemv(x, packed, 1100), one)
    finally:
        torch.set_num_threads(old)


# head sizes 8 (plain loops), 48 (stories15M) and 16 (vector paths); 40 positions: 3 softmax chunks
@pytest.mark.parametrize("n_heads, n_kv_heads, tie, dim, length", [
    (4, 4, True, 32, 16), (4, 2, False, 32, 16), (2, 2, True, 96, 40), (4, 2, False, 64, 40)],
    ids=["mha", "gqa", "hd48", "hd16-gqa"])
def test_kernel_step_matches_forward_and_torch_path(lib, n_heads: int, n_kv_heads: int, tie: bool, dim: int,
                                                    length: int) -> None:
    model = _model(n_heads, n_kv_heads, tie, dim)
    tokens = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, exact = model(tokens), copy.deepcopy(model).double()(tokens)
    torch_path = decode_weights(model, kernel=False)
    assert torch_path.kernel is None
    fast = decode_weights(model, kernel=True)
    assert fast.kernel is not None and fast.layers == []  # no PyTorch copies next to the packed ones
    outs = {}
    for name, weights in (("kernel", fast), ("torch", torch_path)):
        caches = model.new_caches(2)
        with torch.no_grad():
            model.hidden(tokens[:, :4], 0, caches)
            outs[name] = torch.stack([decode_step(model, tokens[:, p:p + 1], p, caches, weights)
                                      for p in range(4, length)], dim=1)
        if name == "kernel":  # the kernel wrote the same keys and values the forward would
            ref = model.new_caches(2)
            with torch.no_grad():
                model.hidden(tokens, 0, ref)
            for c, r in zip(caches, ref):  # fp32 rounding relative to the cache's scale (the PyTorch
                for got, want in ((c.k, r.k), (c.v, r.v)):  # step differs as much: ~5e-5 at dim 96)
                    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    # fp32 rounding relative to the logits' scale: both decode paths within 1e-5 of float64 (the fp32
    # forward itself is ~1e-5 off at dim 96, the kernel ~4e-6), so within 2e-5 of the fp32 forward
    tol = 1e-5 * float(full.abs().max())
    for got in (outs["kernel"], outs["torch"]):
        assert (got.double() - exact[:, 4:]).abs().max() <= tol
    torch.testing.assert_close(outs["kernel"], full[:, 4:], atol=2 * tol, rtol=1e-5)
    torch.testing.assert_close(outs["kernel"], outs["torch"], atol=2 * tol, rtol=1e-5)
    assert torch.equal(outs["kernel"].argmax(-1), full[:, 4:].argmax(-1))


def test_vector_exp_matches_float64(lib) -> None:
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-87.3, 88.7, 1e-7, -1e-7])])
    got, exact = kernels.vexp(x).double(), x.double().exp()
    normal = (exact >= torch.finfo(torch.float32).tiny) & (exact <= torch.finfo(torch.float32).max)
    assert ((got - exact).abs() <= 2 * 2.0**-24 * exact)[normal].all()  # within 2 ulp (SLEEF: 1)
    assert (got[exact < torch.finfo(torch.float32).tiny] == 0).all()  # flushed to zero, never garbage
    assert torch.isinf(got[exact > torch.finfo(torch.float32).max]).all()
    special = kernels.vexp(torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0]))
    assert special[0] == 0 and special[1] == float("inf") and special[2].isnan() and special[3] == 1
    assert torch.equal(kernels.vexp(x[:21]), kernels.vexp(x[:37])[:21])  # the scalar tail, same values


def test_packed_weights_sit_in_one_aligned_arena(lib) -> None:
    model = _model(dim=64)
    kern = decode_weights(model).kernel
    assert kern.arena.data_ptr() % kernels.HUGE_PAGE == 0
    first = model.layers[0].attention
    wqkv = torch.cat([first.wq.weight, first.wk.weight, first.wv.weight])
    packed = pack_rows(wqkv).view(-1)
    assert torch.equal(kern.arena[:packed.numel()], packed)  # layer 0's qkv first: the order read
    head = pack_rows(model.output.weight).view(-1)
    assert torch.equal(kern.arena[-head.numel():], head)  # the output head last
    print(f"packed weights on transparent huge pages: {kern.huge_pages()}")


def test_streamed_output_head_gives_the_same_logits(lib) -> None:
    """Non-temporal prefetches of the head change where its lines are cached, never a value."""
    model = _model(n_kv_heads=4)
    layers = [(b.attention_norm.weight, torch.cat([b.attention.wq.weight, b.attention.wk.weight,
                                                    b.attention.wv.weight]), b.attention.wo.weight,
               b.ffn_norm.weight, torch.cat([b.feed_forward.w1.weight, b.feed_forward.w3.weight]),
               b.feed_forward.w2.weight) for b in model.layers]
    cfg, logits = model.cfg, []
    for stream in (False, True):
        kern = kernels.DecodeKernel(lib, dim=cfg.dim, hidden=cfg.hidden_dim, n_heads=cfg.n_heads,
                                    n_kv_heads=cfg.n_kv_heads, eps=cfg.norm_eps,
                                    embedding=model.tok_embeddings.weight, layers=layers, norm=model.norm.weight,
                                    output=model.output.weight, cos=model.freqs_cos, sin=model.freqs_sin,
                                    stream_output=stream)
        caches = model.new_caches(1)
        logits.append(torch.stack([kern.step(torch.tensor([t]), p, caches) for p, t in enumerate([1, 5, 9])]))
    assert torch.equal(logits[0], logits[1])


def test_kernel_follows_new_caches(lib) -> None:
    """The pointers bound for one set of caches must not be reused for another."""
    model = _model()
    weights = decode_weights(model)
    first, second = model.new_caches(1), model.new_caches(1)
    tok = torch.tensor([3])
    a = weights.kernel.step(tok, 0, first)
    b = weights.kernel.step(tok, 0, second)
    assert torch.equal(a, b) and first[0].k[0, :, 0].abs().sum() > 0
    torch.testing.assert_close(second[1].k, first[1].k, atol=0, rtol=0)
    first[0].k = torch.zeros_like(first[0].k)  # a new tensor in an old cache: rebound, written
    weights.kernel.step(tok, 0, first)
    assert torch.equal(first[0].k, second[0].k)
    assert weights.kernel.try_step(tok, 0, model.new_caches(1, dtype=torch.float64)) is None
    with pytest.raises(ValueError, match="caches do not fit the decode kernel"):
        weights.kernel.step(tok, 0, model.new_caches(1)[:1])


def test_env_switch_turns_the_kernel_off(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "1")
    assert decode_weights(model).kernel is not None
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "0")
    off = decode_weights(model)
    assert off.kernel is None and off.layers  # rebuilt with the PyTorch layout
    assert decode_weights(model, kernel=True).kernel is not None  # the argument wins over the env
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "1")
    assert decode_weights(model).kernel is not None


@pytest.mark.parametrize("n_heads, n_kv_heads, dim", [(4, 2, 32), (2, 2, 96)], ids=["hd8-gqa", "hd48"])
def test_left_padded_rows_match_the_torch_step(lib, n_heads: int, n_kv_heads: int, dim: int) -> None:
    """Per-row RoPE positions and first visible key (left-padded rows) give the PyTorch step's logits, whose
    per-row positions and key mask express the same rows; a value out of range is an error naming it."""
    model = _model(n_heads, n_kv_heads, True, dim)
    fast, torch_path = decode_weights(model, kernel=True), decode_weights(model, kernel=False)
    pad = torch.tensor([0, 3, 5])  # row b's real tokens start at cache column pad[b]
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    outs = {}
    for name in ("kernel", "torch"):
        caches = model.new_caches(3)
        with torch.no_grad():  # fill columns 0..7 as a prefill would (padding columns hold junk keys)
            model.hidden(tokens[:, :8], 0, caches)
            steps = []
            for pos in range(8, 12):
                rope = pos - pad
                if name == "kernel":
                    steps.append(fast.kernel.step(tokens[:, pos], pos, caches, rope_pos=rope, first_key=pad))
                else:
                    visible = torch.arange(pos + 1)[None, :] >= pad[:, None]
                    steps.append(torch_path.step(tokens[:, pos], pos, caches, rope_pos=rope,
                                                 visible=visible[:, None, None, :]))
            outs[name] = torch.stack(steps, dim=1)
    tol = 2e-5 * float(outs["torch"].abs().max())
    torch.testing.assert_close(outs["kernel"], outs["torch"], atol=tol, rtol=1e-5)
    caches = model.new_caches(3)
    with pytest.raises(ValueError, match=r"first_key must be \(3,\) values in 0\.\.2"):
        fast.kernel.step(tokens[:, 2], 2, caches, first_key=torch.tensor([0, 3, 0]))
    with pytest.raises(ValueError, match=r"rope_pos must be \(3,\) values in 0\.\.63"):
        fast.kernel.step(tokens[:, 2], 2, caches, rope_pos=torch.tensor([0, 64, 1]))


@pytest.mark.parametrize("n_heads, n_kv_heads, dim", [(4, 2, 32), (2, 2, 96)], ids=["hd8-gqa", "hd48"])
def test_rows_at_positions_of_their_own_match_the_torch_step(lib, n_heads: int, n_kv_heads: int, dim: int) -> None:
    """``pos`` per row (the serving engine's slots, each at its own length) gives the PyTorch static step's
    logits and cache columns; a position out of range, or a first key past a row's position, is an error."""
    model = _model(n_heads, n_kv_heads, True, dim)
    fast, torch_path = decode_weights(model, kernel=True), decode_weights(model, kernel=False)
    lengths = torch.tensor([3, 9, 6])  # each row's prompt length: its first decode column
    tokens = torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(model.cfg.max_seq_len)
    outs, kept = {}, {}
    for name in ("kernel", "torch"):
        caches = model.new_caches(3)
        with torch.no_grad():
            for b in range(3):  # each row's prompt alone into its row, as the engine's prefill writes it
                rows = [_SlotCache(c.k[b:b + 1], c.v[b:b + 1]) for c in caches]
                model.hidden(tokens[b:b + 1, :int(lengths[b])], 0, rows)
            steps = []
            for step in range(4):
                pos, tok = lengths + step, tokens[torch.arange(3), lengths + step]
                if name == "kernel":
                    steps.append(fast.kernel.step(tok, pos, caches))
                else:
                    steps.append(torch_path.static_step(tok, pos, caches, positions))
        outs[name], kept[name] = torch.stack(steps, dim=1), caches
    tol = 2e-5 * float(outs["torch"].abs().max())
    torch.testing.assert_close(outs["kernel"], outs["torch"], atol=tol, rtol=1e-5)
    for a, b in zip(kept["kernel"], kept["torch"]):
        torch.testing.assert_close(a.k[:, :, :13], b.k[:, :, :13], atol=1e-5, rtol=1e-5)
    caches = model.new_caches(3)
    with pytest.raises(ValueError, match=r"pos must be \(3,\) values in 0\.\.63"):
        fast.kernel.step(tokens[:, 0], torch.tensor([1, 64, 2]), caches)
    with pytest.raises(ValueError, match="first_key must not pass each row's pos"):
        fast.kernel.step(tokens[:, 0], torch.tensor([1, 5, 2]), caches, first_key=torch.tensor([0, 0, 3]))


def test_kernel_rejects_bad_tokens_and_unfit_caches(lib) -> None:
    model = _model()
    weights = decode_weights(model)
    caches = model.new_caches(1)
    with pytest.raises(ValueError, match=r"token ids must be in 0\.\.96"):
        weights.kernel.step(torch.tensor([97]), 0, caches)
    with pytest.raises(ValueError, match="caches hold batch 1, tokens have 2 rows"):
        weights.kernel.step(torch.tensor([1, 2]), 0, caches)
    assert not weights.kernel.accepts(model.new_caches(1)[:1])  # too few layers: not for the kernel
    assert weights.kernel.accepts(caches)


def test_build_caches_the_library(lib, tmp_path) -> None:
    t0 = time.perf_counter()
    path = build_decode_kernel(tmp_path)
    seconds = time.perf_counter() - t0
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert build_decode_kernel(tmp_path) == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.sha256"]  # no temp files left
    print(f"kernel compile: {seconds:.2f} s")


def test_no_compiler_falls_back_with_one_warning(fresh_loader, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXX", os.path.join(tmp_path, "no-such-compiler"))
    monkeypatch.setenv("LLAMALIT_KERNEL_DIR", str(tmp_path / "kernels"))
    model = _model()
    with caplog.at_level(logging.WARNING, logger="llamalit.inference.kernels"):
        weights = decode_weights(model)
        assert load_decode_kernel() is None
    assert weights.kernel is None and weights.layers  # the PyTorch decode path
    warnings = [r for r in caplog.records if "decode kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
    assert len(generate(model, [1, 2], 5, temperature=0.0)) == 5


def test_failed_compile_leaves_no_library(fresh_loader, tmp_path, monkeypatch) -> None:
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                    "echo 'error: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(RuntimeError, match="broken compiler"):
        build_decode_kernel(tmp_path / "kernels")
    assert not list((tmp_path / "kernels").iterdir())
