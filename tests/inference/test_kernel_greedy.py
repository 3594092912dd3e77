"""Greedy steps of the compiled decode kernel: the argmax of its own logits, screened by an int8 head."""

from __future__ import annotations

import pytest
import torch
from attentive_llamas import attentive_llama

from llamalit.inference import kernels
from llamalit.inference.decode import decode_weights
from llamalit.inference.generate import generate
from llamalit.inference.kernels import DecodeKernel, quantize_rows
from llamalit.model.llama import Llama


def _model(vocab: int = 611, tie: bool = False, seed: int = 0) -> Llama:
    return attentive_llama(seed, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                           max_seq_len=64, tie_embeddings=tie)


def _kernel(lib, model: Llama, screen: bool) -> DecodeKernel:
    cfg = model.cfg
    layers = [(b.attention_norm.weight, torch.cat([b.attention.wq.weight, b.attention.wk.weight,
                                                    b.attention.wv.weight]), b.attention.wo.weight,
               b.ffn_norm.weight, torch.cat([b.feed_forward.w1.weight, b.feed_forward.w3.weight]),
               b.feed_forward.w2.weight) for b in model.layers]
    return DecodeKernel(lib, dim=cfg.dim, hidden=cfg.hidden_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                        eps=cfg.norm_eps, embedding=model.tok_embeddings.weight, layers=layers,
                        norm=model.norm.weight, output=model.output.weight, cos=model.freqs_cos,
                        sin=model.freqs_sin, screen=screen)


def _compare(kern: DecodeKernel, model: Llama, batch: int, steps: int = 24) -> list[int]:
    """Greedy ids == argmax of step()'s logits at every position, and the same caches; the fp32 rows read."""
    a, b = model.new_caches(batch), model.new_caches(batch)
    tok = torch.arange(1, batch + 1)
    out = torch.empty(batch, dtype=torch.long)
    read = []
    for pos in range(steps):
        want = kern.step(tok, pos, a).argmax(-1)
        assert kern.greedy(tok, pos, b, out)
        assert torch.equal(out, want), pos
        read.append(kern.exact_rows)
        tok = want
    for x, y in zip(a, b):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v)
    return read


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("batch,threads,tie", [(1, 1, False), (2, 1, True), (1, 2, False), (3, 2, False)])
def test_greedy_is_the_argmax_of_the_logits(lib, screen: bool, batch: int, threads: int, tie: bool) -> None:
    model = _model(tie=tie)
    kern = _kernel(lib, model, screen)
    kern.threads = threads
    assert kern.screen is screen
    read = _compare(kern, model, batch)
    vocab = model.cfg.vocab_size
    if screen:  # the int8 screen leaves only a strip or a few to recompute
        assert sum(read) < 0.25 * len(read) * vocab * batch
    else:
        assert all(r == vocab * batch for r in read)


def test_exact_ties_go_to_the_first_row_as_in_torch(lib) -> None:
    model = _model(vocab=400)
    kern = _kernel(lib, model, True)
    caches = model.new_caches(1)
    top = int(kern.step(torch.tensor([1]), 0, caches).argmax())
    twin = (top + 200) % 400  # another strip and panel, before or after the winner
    with torch.no_grad():
        model.output.weight[twin] = model.output.weight[top]
    kern = _kernel(lib, model, True)
    caches, out = model.new_caches(1), torch.empty(1, dtype=torch.long)
    logits = kern.step(torch.tensor([1]), 0, caches)
    assert logits[0, top] == logits[0, twin]  # the same weights in another lane: bit-identical sums
    assert kern.greedy(torch.tensor([1]), 0, model.new_caches(1), out)
    assert int(out) == min(top, twin) == int(logits.argmax())


def test_non_finite_values_fall_back_to_the_whole_head(lib) -> None:
    model = _model()
    with torch.no_grad():
        model.norm.weight[3] = float("inf")  # the head's input holds inf: logits inf, -inf or NaN
    kern = _kernel(lib, model, True)
    logits = kern.step(torch.tensor([2]), 0, model.new_caches(1))
    assert not torch.isfinite(logits).all()
    out = torch.empty(1, dtype=torch.long)
    assert kern.greedy(torch.tensor([2]), 0, model.new_caches(1), out)
    assert int(out) == int(logits.argmax()) and kern.exact_rows == model.cfg.vocab_size
    with torch.no_grad():
        model.output.weight[5, 0] = float("nan")
    assert not _kernel(lib, model, True).screen  # a head that is not finite is never screened


def test_quantize_rows_bound() -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 33) * torch.logspace(-30, 30, 40)[:, None]
    w[7] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale[7] == 0 and (q[7] == 0).all()
    err = (w.double() - scale.double()[:, None] * q.double()).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 1e-6)).all() and kernels.screen_bound_holds(w, q, scale)
    tiny = torch.full((2, 8), 1e-44)  # the scale underflows to 0: the bound fails, no screen
    assert not kernels.screen_bound_holds(tiny, *quantize_rows(tiny))


def test_generate_takes_the_greedy_step_and_sampling_does_not(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    calls = []
    real = DecodeKernel.greedy
    monkeypatch.setattr(DecodeKernel, "greedy", lambda self, *a: calls.append(1) or real(self, *a))
    ids = generate(model, [1, 2], 12, temperature=0.0)
    assert len(calls) == 11 and decode_weights(model).kernel.screen
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert generate(model, [1, 2], 12, temperature=0.0) == ids  # the PyTorch step, argmax in torch
    monkeypatch.delenv(kernels.ENV_SWITCH)
    calls.clear()
    generate(model, [1, 2], 5, temperature=0.8, seed=3)
    assert not calls
    monkeypatch.setenv(kernels.SCREEN_SWITCH, "0")  # read when the packed weights are built: a fresh model
    same = _model()
    assert generate(same, [1, 2], 12, temperature=0.0) == ids and not decode_weights(same).kernel.screen
