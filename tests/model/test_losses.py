"""linear_cross_entropy: chunked == plain (float64), accuracy, N == 0, non-leaf / frozen weights, bf16 autocast,
that the chunked path never creates an (N, V) tensor, the masked (compiled) loss, optional packages, auto."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from llamalit.model.losses import (
    AUTO_CHUNK_ELEMENTS,
    IGNORE_INDEX,
    LossOutput,
    default_chunk_size,
    impl_available,
    liger_available,
    linear_cross_entropy,
    resolve_loss_impl,
)

F64 = dict(rtol=1e-12, atol=1e-14)


def make(n: int, d: int = 16, v: int = 101, dtype=torch.float64, seed: int = 0, hit_every: int = 3):
    """Hidden (n, d), weight (v, d), targets (n,) where every ``hit_every``-th row's target is its argmax."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if n:
        best = (h @ w.T).argmax(1)
        t[::hit_every] = best[::hit_every]
    return h.requires_grad_(), w.requires_grad_(), t


def loss_and_grads(impl, h, w, t, inputs=None, **kw):
    out = linear_cross_entropy(h, w, t, impl=impl, **kw)
    inputs = inputs or [x for x in (h, w) if x.requires_grad]
    grads = torch.autograd.grad(out.loss * 2.5, inputs)  # grad_output != 1: backward must scale
    return out, grads


@pytest.mark.parametrize("n,chunk", [(37, 1), (37, 5), (37, 8), (37, 36), (37, 37), (37, 100), (37, None),
                                     (1, 1), (1, 4), (64, 16)])
def test_chunked_equals_plain_float64(n, chunk):
    h, w, t = make(n)
    ref, (rh, rw) = loss_and_grads("plain", h, w, t, accuracy=True)
    out, (gh, gw) = loss_and_grads("chunked", h, w, t, chunk_size=chunk, accuracy=True)
    assert out.loss.dtype == torch.float64 and out.loss.shape == ()
    torch.testing.assert_close(out.loss, ref.loss, **F64)
    torch.testing.assert_close(out.loss, F.cross_entropy(h @ w.T, t), **F64)
    torch.testing.assert_close(gh, rh, **F64)
    torch.testing.assert_close(gw, rw, **F64)
    assert out.correct.dtype == torch.long and not out.correct.requires_grad
    assert out.correct.item() == ref.correct.item() == int(((h @ w.T).argmax(1) == t).sum())


def test_accuracy_count_and_none():
    h, w, t = make(50, hit_every=4)  # 13 rows forced to hit; random rows rarely do
    expected = int(((h @ w.T).argmax(1) == t).sum())
    assert 13 <= expected < 50
    for impl in ("plain", "chunked", "auto"):
        assert linear_cross_entropy(h, w, t, impl=impl, chunk_size=7, accuracy=True).correct.item() == expected
        assert linear_cross_entropy(h, w, t, impl=impl).correct is None
    assert isinstance(linear_cross_entropy(h, w, t), LossOutput)


@pytest.mark.parametrize("impl", ["plain", "chunked", "auto"])
def test_empty_batch_is_zero_with_zero_grads(impl):
    h, w, t = make(0)
    out, (gh, gw) = loss_and_grads(impl, h, w, t, accuracy=True)
    assert out.loss.item() == 0.0 and out.correct.item() == 0
    assert gh.shape == (0, 16) and torch.equal(gw, torch.zeros_like(w))


def test_nonleaf_weight_lora_grads_match_plain():
    _, w0, t = make(29)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(29, 16, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, 4, generator=g, dtype=torch.float64, requires_grad=True)
    base = w0.detach()  # frozen base, trainable adapter
    results = []
    for impl in ("plain", "chunked"):
        out, grads = loss_and_grads(impl, h, base + b @ a, t, inputs=[h, a, b], chunk_size=6)
        results.append((out.loss, *grads))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, **F64)


def test_frozen_weight_skips_weight_grad():
    h, w, t = make(40)
    w.requires_grad_(False)
    ref, (rh,) = loss_and_grads("plain", h, w, t)
    with FlopCounterMode(display=False) as fc:
        out = linear_cross_entropy(h, w, t, impl="chunked", chunk_size=9)
        out.loss.backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, rh * 1.0 / 2.5, **F64)
    # logits + grad-hidden matmuls only (2 x 2*N*D*V flops); the weight-grad matmul would make it 3
    assert fc.get_total_flops() == 2 * (2 * 40 * 16 * 101)


def test_frozen_hidden_gives_weight_grad_only():
    h, w, t = make(23)
    h.requires_grad_(False)
    _, (rw,) = loss_and_grads("plain", h, w, t)
    _, (gw,) = loss_and_grads("chunked", h, w, t, chunk_size=4)
    torch.testing.assert_close(gw, rw, **F64)


def test_no_grad_mode_computes_only_logits():
    h, w, t = make(31)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = linear_cross_entropy(h, w, t, impl="chunked", chunk_size=8)
    assert out.loss.grad_fn is None
    assert fc.get_total_flops() == 2 * 31 * 16 * 101
    torch.testing.assert_close(out.loss, F.cross_entropy(h @ w.T, t).detach(), **F64)


def test_backward_twice_is_refused():
    """The stored grads are scaled in place, so a second backward through the same call must not run."""
    h, w, t = make(12)
    _, (rh,) = loss_and_grads("plain", h, w, t, inputs=[h])
    loss = linear_cross_entropy(h, w, t, impl="chunked", chunk_size=5).loss
    (loss * 2.5).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, rh, **F64)  # the first one is right
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bf16_autocast_cpu_close_to_plain():
    """Under CPU bf16 autocast both paths do the matmuls in bf16 and the softmax in fp32.

    Tolerances: the loss differs only by fp32 summation order (rtol 1e-5; seen 1e-7); the hidden grad is the same bf16
    matmul per row (rtol 1e-2, i.e. ~2 bf16 ulps); the weight grad of the plain path is one bf16-rounded
    (V, D) product while the chunked one sums per-chunk bf16 products in fp32, so they differ by a few bf16
    ulps of the largest entry (atol 2e-2 * max|grad|).
    """
    h32, w32, t = make(96, d=32, v=257, dtype=torch.float32)
    res = {}
    for impl in ("plain", "chunked"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = loss_and_grads(impl, h32, w32, t, chunk_size=20, accuracy=True)
        res[impl] = (out, grads)
    (ref, (rh, rw)), (out, (gh, gw)) = res["plain"], res["chunked"]
    assert out.loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert out.correct.item() == ref.correct.item()
    torch.testing.assert_close(gh, rh, rtol=1e-2, atol=1e-2 * rh.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=0, atol=2e-2 * rw.abs().max().item())
    # and it really ran in bf16: the fp32 loss differs from it by more than fp32 noise
    assert abs(out.loss.item() - F.cross_entropy(h32 @ w32.T, t).item()) > 1e-5
    # bf16 parameters (no autocast): grads come back in bf16, loss in fp32
    hb, wb = h32.detach().bfloat16().requires_grad_(), w32.detach().bfloat16().requires_grad_()
    outb, (ghb, gwb) = loss_and_grads("chunked", hb, wb, t, chunk_size=20)
    assert outb.loss.dtype == torch.float32 and ghb.dtype == gwb.dtype == torch.bfloat16


class MaxTensorMode(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


def run_watched(impl, h, w, t, **kw):
    """Forward + backward under MaxTensorMode and a saved-tensors hook; returns (max op output, max saved)."""
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with MaxTensorMode() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = linear_cross_entropy(h, w, t, impl=impl, **kw)
        out.loss.backward()
    return mode.max_numel, max(saved, default=0), out


def test_watchers_see_plain_logits():
    """The detector below can fail: on the plain path it sees (N, V) outputs and saved tensors."""
    h, w, t = make(64, v=301, dtype=torch.float32)
    max_out, max_saved, _ = run_watched("plain", h, w, t)
    assert max_out == max_saved == 64 * 301


def test_chunked_never_creates_n_by_v():
    """N=4096, V=32000 (fp32: 524 MB of logits): no aten op returns, and autograd saves, nothing near N*V.

    Every tensor the function creates (forward and backward) is the output of some aten op, so the largest
    op output bounds the largest allocation; the chunk is default_chunk_size(V) rows, so it must be
    chunk x V (~2**23 elements), 15x below N*V. Plain on the same shapes would report N*V (test above).
    """
    n, v = 4096, 32000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 8, generator=g, requires_grad=True)
    w = (torch.randn(v, 8, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    assert n * v > AUTO_CHUNK_ELEMENTS  # so "auto" (no liger on CPU) goes chunked
    max_out, max_saved, out = run_watched("auto", h, w, t, accuracy=True)
    assert type(out.loss.grad_fn).__name__ == "_ChunkedLinearCrossEntropyBackward"
    assert max_out == default_chunk_size(v) * v < n * v // 15
    assert max_saved <= v * 8  # the stored grads: (V, D) and (N, D)
    assert w.grad.shape == (v, 8) and torch.isfinite(out.loss)
    if torch.cuda.is_available():  # real allocator peak where there is one
        hc, wc = h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linear_cross_entropy(hc, wc, t.cuda(), impl="chunked").loss.backward()
        assert torch.cuda.max_memory_allocated() - base < n * v * 4 / 4


def test_auto_small_is_plain():
    h, w, t = make(10)
    assert type(linear_cross_entropy(h, w, t).loss.grad_fn).__name__ != "_ChunkedLinearCrossEntropyBackward"


def test_clear_errors():
    h, w, t = make(5)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, w, t, impl="fast")
    with pytest.raises(ValueError, match=r"weight \(V, D\)"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets must be a long tensor"):
        linear_cross_entropy(h, w, t[:4])
    with pytest.raises(ValueError, match="hidden is torch.float32 but weight is torch.float64"):
        linear_cross_entropy(h.detach().float(), w, t, impl="chunked")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(h, w, t, impl="chunked", chunk_size=-1)
    expected = "needs CUDA tensors" if liger_available() else "pip install liger-kernel"
    with pytest.raises((ImportError, ValueError), match=expected):
        linear_cross_entropy(h, w, t, impl="liger")


def test_liger_call_plumbing(monkeypatch):
    """The liger wrapper, against a stand-in with liger-kernel 0.8.5's interface (liger itself needs CUDA)."""
    import sys
    import types
    from collections import namedtuple

    import llamalit.model.losses as losses

    seen = {}
    Output = namedtuple("CrossEntropyOutput", "loss z_loss token_accuracy predicted_tokens")

    class FakeLoss(torch.nn.Module):  # forward(lin_weight, _input, target), as liger's
        def __init__(self, ce_weight=None, ignore_index=-100, reduction="mean", accum_dtype=None,
                     return_predicted_tokens=False):
            super().__init__()
            seen.update(accum_dtype=accum_dtype, preds=return_predicted_tokens)

        def forward(self, lin_weight, _input, target, bias=None):
            logits = _input @ lin_weight.T
            loss = F.cross_entropy(logits, target)
            return Output(loss, None, None, logits.argmax(1)) if seen["preds"] else loss

    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = FakeLoss
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    h, w, t = make(30)
    ref, (rh, rw) = loss_and_grads("plain", h, w, t, accuracy=True)
    for accuracy in (True, False):
        out = losses._liger_call(h, w, t, None, accuracy)
        gh, gw = torch.autograd.grad(out.loss * 2.5, (h, w))
        assert seen == {"accum_dtype": torch.float32, "preds": accuracy}
        torch.testing.assert_close(out.loss, ref.loss, **F64)
        torch.testing.assert_close(gw, rw, **F64)
        assert (out.correct is None) if not accuracy else out.correct.item() == ref.correct.item()


def _masked_reference(h, w, t):
    """float64 reference: mean cross-entropy over the rows whose target is not IGNORE_INDEX."""
    keep = t != IGNORE_INDEX
    return F.cross_entropy(h.double()[keep] @ w.double().T, t[keep], reduction="mean")


@pytest.mark.parametrize("impl", ["plain", "compiled", "chunked"])
def test_every_cpu_impl_matches_a_float64_reference(impl):
    """Loss and grads of each impl that runs on the CPU (float32) against float64; plain and compiled also take
    IGNORE_INDEX rows (what the one-graph step hands them: every position); compiled traced by dynamo."""
    h, w, t = make(40, dtype=torch.float32, seed=3)
    if impl != "chunked":
        t[::4] = IGNORE_INDEX
    ref = _masked_reference(h, w, t)
    rh, rw = torch.autograd.grad(ref, [h, w])
    fn = linear_cross_entropy
    if impl == "compiled":
        fn = torch.compile(linear_cross_entropy, fullgraph=True, dynamic=False, backend="aot_eager")
    out = fn(h, w, t, impl=impl, accuracy=True)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)  # float32 grads of the float64 reference
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    keep = t != IGNORE_INDEX
    assert int(out.correct) == int(((h @ w.T).argmax(1) == t)[keep].sum())


def test_all_ignored_rows_give_zero_loss_and_grads():
    h, w, t = make(6)
    t[:] = IGNORE_INDEX
    out, (gh, gw) = loss_and_grads("compiled", h, w, t)
    assert out.loss.item() == 0.0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("impl, package", [("liger", "liger-kernel"), ("cce", "cut-cross-entropy")])
def test_missing_optional_package_names_the_pip_command(impl, package, monkeypatch):
    import sys

    from llamalit.model import losses

    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[impl]
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, installed or not
    losses.impl_available.cache_clear()
    try:
        h, w, t = make(5)
        with pytest.raises(ImportError, match=f"pip install {package}"):
            linear_cross_entropy(h, w, t, impl=impl)
        with pytest.raises(ImportError, match=f"pip install {package}"):
            resolve_loss_impl(impl, "cuda", compiled=True)
    finally:
        losses.impl_available.cache_clear()


def test_resolve_loss_impl():
    assert resolve_loss_impl("auto", "cuda", compiled=True) == "compiled"  # llama2.c: the loss in the graph
    assert resolve_loss_impl("auto", "cpu", compiled=True) == "compiled"
    assert resolve_loss_impl("auto", "cuda", compiled=False) == "plain"
    assert resolve_loss_impl("auto", "cpu", compiled=False) == "chunked"
    for given in ("plain", "chunked", "compiled"):
        assert resolve_loss_impl(given, "cpu", compiled=False) == given
    with pytest.raises(ValueError, match="loss_impl='fast'"):
        resolve_loss_impl("fast", "cuda", compiled=True)
    for impl in ("liger", "cce"):
        if impl_available(impl):
            with pytest.raises(ValueError, match="CUDA only"):
                resolve_loss_impl(impl, "cpu", compiled=False)
