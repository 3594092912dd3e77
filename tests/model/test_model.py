"""The Llama model: preset sizes, parity with transformers, loss, init, errors, the decode path."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamalit.checkpoints.hf_layout import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    permute_from_hf,
    permute_to_hf,
    to_hf_state_dict,
)
from llamalit.inference.decode import decode_step, decode_weights
from llamalit.inference.kernels import load_decode_kernel
from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig, RMSNorm, apply_rope, rope_tables


@pytest.mark.parametrize("name, expected", [
    ("stories260k", 260_032),
    ("stories15m", 15_191_712),
    ("stories42m", 41_689_600),
    ("stories110m", 109_529_856),
])
def test_preset_parameter_counts(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = Llama(ModelConfig.preset(name))
    assert model.num_params() == expected


def test_hidden_dim_derivation() -> None:
    assert ModelConfig(dim=288, multiple_of=32).hidden_dim == 768
    assert ModelConfig.preset("stories110m").hidden_dim == 2048
    assert ModelConfig.preset("stories260k").hidden_dim == 172  # multiple_of=4
    assert ModelConfig(dim=288, hidden_dim=1000).hidden_dim == 1000  # given wins


def test_config_dict_round_trip() -> None:
    cfg = ModelConfig.preset("tiny", tie_embeddings=False)
    assert ModelConfig.from_dict({**cfg.to_dict(), "_target_": "ignored"}) == cfg


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Random values everywhere (norm weights too), so every parameter matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


def _small(n_heads: int, n_kv_heads: int, tie: bool) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=61,
                       multiple_of=8, max_seq_len=32, tie_embeddings=tie)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_equal_transformers(n_heads: int, n_kv_heads: int, tie: bool, monkeypatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    def rmsnorm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
        # transformers rounds to float32 here even for float64 input; keep float64 so the
        # comparison checks the architecture to ~1e-12 instead of float32 rounding.
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_input_dtype)

    cfg = _small(n_heads, n_kv_heads, tie)
    ours = Llama(cfg).double().eval()
    _randomize(ours)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(cfg), attn_implementation="sdpa")).double().eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert unexpected == []
    assert set(missing) <= ({"lm_head.weight"} if tie else set())
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert expected.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - expected).abs().max() < 1e-11  # really float64 end to end (float32 rounding is ~1e-7)


def test_rope_permutation_round_trip() -> None:
    w = torch.randn(24, 10)
    to_hf = permute_to_hf(w, n_heads=2)
    assert not torch.equal(to_hf, w)
    # head 0 has 12 rows: adjacent pairs (0,1),(2,3).. become halves: rows 0,2,4..10 then 1,3..11
    assert torch.equal(to_hf[:6], w[0:12:2]) and torch.equal(to_hf[6:12], w[1:12:2])
    assert torch.equal(permute_from_hf(to_hf, n_heads=2), w)

    cfg = _small(4, 2, tie=False)
    sd = Llama(cfg).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for name, t in sd.items():
        assert torch.equal(back[name], t), name
    back_cfg = config_from_hf(hf_config_dict(cfg))
    assert replace(back_cfg, multiple_of=cfg.multiple_of) == cfg  # multiple_of is moot: hidden_dim given


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_complex_and_real_forms_agree(per_row: bool, monkeypatch) -> None:
    """Eager mode rotates with one complex multiply, torch.compile with the real form: same values and gradients
    (float64), for shared (T, D/2) and per-row (B, T, D/2) tables, and half precision comes back as it went in."""
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 16)
    if per_row:
        positions = torch.randint(0, 16, (2, 5))
        cos, sin = cos[positions], sin[positions]
    else:
        cos, sin = cos[:5], sin[:5]
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        leaf = x.clone().requires_grad_()
        out = apply_rope(leaf, cos.double(), sin.double())
        out.pow(2).mul(torch.arange(8.0, dtype=torch.float64)).sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # the definition: pair (x0, x1) turned by the position's angle
    c, s = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    torch.testing.assert_close(results[0][0][..., 0::2], x0 * c - x1 * s, rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][0][..., 1::2], x0 * s + x1 * c, rtol=0, atol=1e-12)
    monkeypatch.undo()
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_unpadded_rows_equal_padded_rows_at_the_real_tokens() -> None:
    """``hidden(lengths=...)`` runs norms, linears and SwiGLU on the real tokens only: the same values (float64)
    as the padded forward at those tokens, whole rows from position 0 and rows on top of a KV cache."""
    torch.manual_seed(0)
    model = Llama(_small(4, 2, tie=True)).double().eval()
    lengths = torch.tensor([7, 3, 5])
    tokens = torch.randint(1, 61, (3, 7))
    real = torch.arange(7)[None, :] < lengths[:, None]
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(tokens, lengths=lengths), model.hidden(tokens)[real],
                                   rtol=0, atol=1e-12)
        caches, padded_caches = model.new_caches(3), model.new_caches(3)
        model.hidden(tokens, 0, caches)
        model.hidden(tokens, 0, padded_caches)
        more = torch.randint(1, 61, (3, 4))
        more_lengths = torch.tensor([4, 2, 1])
        got = model.hidden(more, 7, caches, lengths=more_lengths)
        want = model.hidden(more, 7, padded_caches)[torch.arange(4)[None, :] < more_lengths[:, None]]
    assert got.shape == (7, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_loss_equals_cross_entropy_and_its_gradient() -> None:
    cfg = _small(4, 2, tie=True)
    torch.manual_seed(0)
    model = Llama(cfg).double()
    _randomize(model)
    tokens = torch.randint(0, cfg.vocab_size, (3, 12))
    labels = torch.randint(0, cfg.vocab_size, (3, 12))
    labels[0, :5] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX

    loss = model.loss(tokens, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)

    # every position through the head with IGNORE_INDEX masked (the one-graph path): the same loss and grads
    masked = model.loss(tokens, labels, loss_impl="compiled")
    masked_grads = torch.autograd.grad(masked, list(model.parameters()))
    torch.testing.assert_close(masked, ref, atol=1e-12, rtol=0)
    for g, r in zip(masked_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_init_std() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=16)
    model = Llama(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1.0), name  # RMSNorm weights start at one
            continue
        want = residual if name.endswith(("wo.weight", "w3.weight")) else 0.02
        assert abs(p.std().item() - want) < 0.03 * want, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.03 * want, name


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=30, n_heads=4), "dim=30 must be divisible by n_heads=4"),
    (dict(dim=32, n_heads=4, n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(dim=36, n_heads=12), "head_dim=3 must be even"),
])
def test_bad_configs_are_rejected(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ModelConfig(**kwargs)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="stories15m"):
        ModelConfig.preset("stories16m")


def test_too_long_sequence_is_rejected() -> None:
    model = Llama(ModelConfig.preset("tiny", max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rmsnorm_in_float32_under_half_precision() -> None:
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(4, 64) * 3
    xb = x.bfloat16()
    xf = xb.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16() * norm.weight
    got = norm(xb)
    assert torch.equal(got, expected)
    # in float16, squaring 400 overflows (65504 max): a half-precision norm would give zeros
    big = torch.full((1, 64), 400.0, dtype=torch.float16)
    out = norm(big)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), norm.weight.detach().expand(1, 64), atol=1e-2, rtol=1e-2)


# ---- the one-token decode path used by generate ------------------------------------------------

def _decode_all(model: Llama, tokens: torch.Tensor, prefill: int, kernel: bool | None = None) -> torch.Tensor:
    caches = model.new_caches(tokens.shape[0])
    with torch.no_grad():
        model.hidden(tokens[:, :prefill], 0, caches)
        weights = decode_weights(model, kernel)
        steps = [decode_step(model, tokens[:, p:p + 1], p, caches, weights)
                 for p in range(prefill, tokens.shape[1])]
    return torch.stack(steps, dim=1)


def _kernel_param(kernel: bool) -> bool:
    """``kernel``, skipping the test when the compiled kernel is asked for but cannot be built."""
    if kernel and load_decode_kernel() is None:
        pytest.skip("the compiled decode kernel cannot be built here")
    return kernel


# the compiled CPU kernel (llamalit.inference.kernels) and the PyTorch step; tests/test_kernels.py has more
DECODE_PATHS = pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])


@DECODE_PATHS
@pytest.mark.parametrize("n_heads, n_kv_heads, tie", [(4, 4, True), (4, 2, False)])
def test_decode_step_matches_forward(n_heads: int, n_kv_heads: int, tie: bool, kernel: bool) -> None:
    kernel = _kernel_param(kernel)
    cfg = _small(n_heads, n_kv_heads, tie)
    model = Llama(cfg).eval()
    _randomize(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
    weights = decode_weights(model, kernel)
    assert weights is not None and (weights.kernel is not None) == kernel  # the path under test
    torch.testing.assert_close(_decode_all(model, tokens, 5, kernel), full[:, 5:], atol=2e-5, rtol=1e-5)


@DECODE_PATHS
def test_decode_weights_follow_weight_changes(kernel: bool) -> None:
    kernel = _kernel_param(kernel)
    model = Llama(_small(4, 2, tie=True)).eval()
    tokens = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(4))
    first = decode_weights(model, kernel)
    assert decode_weights(model, kernel) is first  # cached while nothing changes
    _randomize(model, seed=7)  # in-place copy_, as load_state_dict and merge_lora do
    assert decode_weights(model, kernel) is not first
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(_decode_all(model, tokens, 3, kernel), full[:, 3:], atol=2e-5, rtol=1e-5)
    assert "_decode_weights" not in "".join(model.state_dict())
    # new tensors (load_state_dict(assign=True), .to(dtype)) also invalidate the copies
    current = decode_weights(model, kernel)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert decode_weights(model, kernel) is not current


def test_decode_step_falls_back_for_wrapped_layers() -> None:
    class Scaled(nn.Linear):  # stands in for a LoRA wrapper: forward differs from its weight
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = Llama(_small(4, 2, tie=True)).eval()
    old = model.layers[1].attention.wv
    model.layers[1].attention.wv = Scaled(old.in_features, old.out_features, bias=False)
    model.layers[1].attention.wv.weight = old.weight
    assert decode_weights(model) is None
    tokens = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(_decode_all(model, tokens, 4), full[:, 4:], atol=2e-5, rtol=1e-5)
