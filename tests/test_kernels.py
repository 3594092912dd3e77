"""The compiled CPU decode kernel: products, the whole step, the switch, and the fallback."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from llamalit import kernels
from llamalit.generate import generate
from llamalit.kernels import build_decode_kernel, gemv, load_decode_kernel, pack_rows
from llamalit.model import Llama, ModelConfig


@pytest.fixture
def lib():
    found = load_decode_kernel()
    if found is None:
        pytest.skip("the decode kernel cannot be built here (no C++ compiler?)")
    return found


@pytest.fixture
def fresh_loader():
    """load_decode_kernel forgets its cached result before and after the test."""
    load_decode_kernel.cache_clear()
    yield
    load_decode_kernel.cache_clear()


def _model(n_heads: int = 4, n_kv_heads: int = 2, tie: bool = True) -> Llama:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=97,
                      multiple_of=8, max_seq_len=64, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)  # norm weights too: every input matters
    return model


def test_pack_rows_layout() -> None:
    w = torch.arange(70 * 3, dtype=torch.float32).view(70, 3)
    packed = pack_rows(w)
    assert packed.shape == (2, 3, kernels.PANEL)
    assert torch.equal(packed[0, :, 5], w[5]) and torch.equal(packed[1, :, 69 - 64], w[69])
    assert not packed[1, :, 6:].any()  # rows past 70 are zero padding


@pytest.mark.parametrize("rows, n, batch", [(1, 1, 1), (70, 33, 3), (200, 288, 1), (1100, 1000, 2)])
def test_gemv_matches_float64(lib, rows: int, n: int, batch: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(rows, n, generator=g), torch.randn(batch, n, generator=g)
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T  # the size of the terms summed
    got = gemv(x, pack_rows(w), rows)
    assert got.shape == (batch, rows)
    assert ((got.double() - exact).abs() <= 1e-6 * scale + 1e-7).all()  # fp32 rounding only
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5 * float(scale.max()))


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


@pytest.mark.parametrize("n_heads, n_kv_heads, tie", [(4, 4, True), (4, 2, False)], ids=["mha", "gqa"])
def test_kernel_step_matches_forward_and_torch_path(lib, n_heads: int, n_kv_heads: int, tie: bool) -> None:
    model = _model(n_heads, n_kv_heads, tie)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    torch_path = model.decode_weights(kernel=False)
    assert torch_path.kernel is None
    fast = model.decode_weights(kernel=True)
    assert fast.kernel is not None and fast.layers == []  # no PyTorch copies next to the packed ones
    outs = {}
    for name, weights in (("kernel", fast), ("torch", torch_path)):
        caches = model.new_caches(2)
        with torch.no_grad():
            model.hidden(tokens[:, :4], 0, caches)
            outs[name] = torch.stack([model.decode_step(tokens[:, p:p + 1], p, caches, weights)
                                      for p in range(4, 16)], dim=1)
        if name == "kernel":  # the kernel wrote the same keys and values the forward would
            ref = model.new_caches(2)
            with torch.no_grad():
                model.hidden(tokens, 0, ref)
            for c, r in zip(caches, ref):
                torch.testing.assert_close(c.k, r.k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(c.v, r.v, atol=1e-5, rtol=1e-5)
    tol = 1e-5 * float(full.abs().max())  # fp32 rounding relative to the logits' scale
    torch.testing.assert_close(outs["kernel"], full[:, 4:], atol=tol, rtol=1e-5)
    torch.testing.assert_close(outs["kernel"], outs["torch"], atol=tol, rtol=1e-5)
    assert torch.equal(outs["kernel"].argmax(-1), full[:, 4:].argmax(-1))


def test_env_switch_turns_the_kernel_off(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    assert model.decode_weights().kernel is not None  # on by default
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "0")
    off = model.decode_weights()
    assert off.kernel is None and off.layers  # rebuilt with the PyTorch layout
    assert model.decode_weights(kernel=True).kernel is not None  # the argument wins over the env
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "1")
    assert model.decode_weights().kernel is not None


def test_kernel_rejects_bad_tokens_and_unfit_caches(lib) -> None:
    model = _model()
    weights = model.decode_weights()
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
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    print(f"kernel compile: {seconds:.2f} s")


def test_no_compiler_falls_back_with_one_warning(fresh_loader, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXX", os.path.join(tmp_path, "no-such-compiler"))
    monkeypatch.setenv("LLAMALIT_KERNEL_DIR", str(tmp_path / "kernels"))
    model = _model()
    with caplog.at_level(logging.WARNING, logger="llamalit.kernels"):
        weights = model.decode_weights()
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
