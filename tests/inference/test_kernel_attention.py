"""The compiled attention for small heads: values against float64 SDPA, and where scoring uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalit.inference.kernels.attention import MAX_HEAD_DIM, attention, kernel_attention
from llamalit.inference.scoring import score_continuations
from llamalit.model.llama import Llama, ModelConfig


def _qkv(b: int, h: int, kv: int, t: int, length: int, d: int, seed: int = 0):
    """q as the model makes it ((B, T, H, D) transposed) and k, v as slices of a longer cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, kv, length + 5, d, generator=g)[:, :, :length]
    v = torch.randn(b, kv, length + 5, d, generator=g)[:, :, :length]
    return q, k, v


def _reference(q, k, v, mask):
    q, k, v = q.double(), k.double(), v.double()
    if mask is None:  # causal, the last query at the last key
        t, length = q.shape[2], k.shape[2]
        mask = torch.ones(t, length, dtype=torch.bool).tril(length - t)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("h, kv, d", [(8, 4, 8), (4, 4, 16), (2, 1, 12), (6, 6, 48), (4, 2, 64)],
                         ids=["hd8-gqa", "hd16", "hd12-any", "hd48", "hd64-gqa"])
@pytest.mark.parametrize("t, length, masked", [(13, 13, False), (7, 20, False), (1, 9, False), (25, 38, True),
                                               (40, 40, True)], ids=["causal", "cached", "one-query", "mask",
                                                                     "mask-square"])
def test_matches_float64_sdpa(lib, h, kv, d, t, length, masked):
    q, k, v = _qkv(3, h, kv, t, length, d)
    mask = None
    if masked:  # a prefix each row sees part of, then causal keys: the shape of scoring's suffix rows
        start = torch.tensor([length - t, 4, 9])
        cols = torch.arange(length)
        prefix = cols[None, None, :] < start[:, None, None]
        causal = (cols[None, :] >= length - t) & (cols[None, :] <= torch.arange(t)[:, None] + length - t)
        mask = (prefix | causal[None])[:, None]
    got = attention(q, k, v, mask)
    assert got.shape == q.shape and got.dtype == torch.float32
    want = _reference(q, k, v, mask)
    assert (got.double() - want).abs().max() < 2e-6  # fp32 rounding only


def test_broadcast_mask_threads_and_a_query_that_sees_nothing(lib):
    q, k, v = _qkv(4, 4, 2, 6, 10, 8, seed=1)
    mask = torch.rand(1, 1, 6, 10, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[..., 0] = True
    one = attention(q, k, v, mask, threads=1)
    assert torch.equal(one, attention(q, k, v, mask, threads=2))  # jobs are independent: same bits
    assert (one.double() - _reference(q, k, v, mask.expand(4, 1, 6, 10))).abs().max() < 2e-6
    mask[..., 3, :] = False  # SDPA would give NaN; the kernel gives zeros
    blind = attention(q, k, v, mask)
    assert torch.equal(blind[:, :, 3], torch.zeros_like(blind[:, :, 3])) and torch.isfinite(blind).all()


def test_declines_what_it_cannot_take(lib):
    q, k, v = _qkv(2, 4, 2, 5, 5, 8)
    assert attention(q.double(), k.double(), v.double()) is None
    assert attention(q, k, v, torch.zeros(2, 1, 5, 5)) is None  # a float (additive) mask
    assert attention(q, k, v, torch.ones(2, 4, 5, 5, dtype=torch.bool)) is None  # a mask per head


def _scoring_model(head_dim: int) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(dim=4 * head_dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                             multiple_of=8, max_seq_len=48)).eval()


def test_scoring_uses_it_for_small_heads_and_gets_the_sdpa_scores(lib, monkeypatch):
    import llamalit.inference.kernels.attention as module

    calls = []
    real = module.attention
    monkeypatch.setattr(module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = _scoring_model(8)
    reqs = [([1, 2, 3, 4, 5], [6, 7], [6, 7, 8]), ([1, 2, 3, 4, 5], [9], [9, 10]), ([11, 12], [], [13]),
            ([3] * 20, [4] * 9, [4] * 10)]
    got = score_continuations(model, reqs, batch_size=2)
    assert calls  # the kernel ran
    assert all(layer.attention.attend_impl is None for layer in model.layers)  # restored after scoring
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "0")
    calls.clear()
    plain = score_continuations(model, reqs, batch_size=2)
    assert not calls  # switched off: SDPA
    for (a, ga), (b, gb) in zip(got, plain):
        assert abs(a - b) < 1e-5 and ga == gb
    monkeypatch.delenv("LLAMALIT_DECODE_KERNEL")
    wide = _scoring_model(2 * MAX_HEAD_DIM)
    with kernel_attention(wide) as used:
        assert not used and all(layer.attention.attend_impl is None for layer in wide.layers)


def test_training_forwards_keep_sdpa(lib):
    model = _scoring_model(8).train()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with kernel_attention(model) as used:
        assert used
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()  # SDPA has a backward; the kernel would have none
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pick_logprobs_matches_log_softmax(lib):
    from llamalit.inference.kernels.logprobs import pick_logprobs

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 517, generator=g) * 4  # a vocab that is not a multiple of 16
    targets = torch.randint(0, 517, (300,), generator=g)
    targets[:40] = logits[:40].argmax(-1)  # some rows hit
    logits[7, 3] = logits[7, 9] = logits[7].max() + 1  # a tie: argmax takes the first
    targets[7], targets[8] = 9, int(logits[8].argmax())
    logits[8, 0] = float("nan")  # a broken row: NaN, never a hit
    logp, hit = pick_logprobs(logits, targets)
    want = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    ok = torch.arange(300) != 8
    assert (logp[ok].double() - want[ok]).abs().max() < 1e-5
    assert torch.equal(hit[ok], (logits.argmax(-1) == targets)[ok]) and int(hit[:40].sum()) == 38 and not hit[7]  # rows 7, 8: tie, NaN
    assert torch.isnan(logp[8]) and not hit[8]
    assert pick_logprobs(logits.double(), targets) is None and pick_logprobs(logits, targets, enabled=False) is None
    with pytest.raises(ValueError, match=r"ids in 0\.\.516"):
        pick_logprobs(logits, torch.full((300,), 517))
