"""Generation: KV cache vs recomputation, top-k / top-p, EOS, seeds, batches, errors, streaming."""

from __future__ import annotations

import pytest
import torch

from llamalit.inference.decode import decode_weights
from llamalit.inference.generate import filter_logits, generate, generate_stream, sample_next
from llamalit.inference.kernels import load_decode_kernel
from llamalit.model.llama import Llama, ModelConfig


def _model(n_heads: int = 4, n_kv_heads: int = 2, tie: bool = True, seed: int = 0) -> Llama:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=97,
                      multiple_of=8, max_seq_len=64, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: decisive, varied greedy choices
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model


def _greedy_by_recompute(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Reference: run the whole sequence through the model for every new token, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kernel", ["0", "1"], ids=["torch_step", "kernel_if_built"])
@pytest.mark.parametrize("n_heads, n_kv_heads, tie", [(4, 4, True), (4, 2, False)], ids=["mha", "gqa"])
def test_kv_cache_greedy_equals_recompute(n_heads: int, n_kv_heads: int, tie: bool, kernel: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", kernel)  # "1": the compiled CPU step when it builds
    model = _model(n_heads, n_kv_heads, tie)
    built = load_decode_kernel() is not None
    assert (decode_weights(model).kernel is not None) == (kernel == "1" and built)
    prompt = [5, 17, 3, 60]
    got = generate(model, prompt, 40, temperature=0.0)
    expected = _greedy_by_recompute(model, prompt, 40)
    assert got == expected
    assert len(set(expected)) > 3  # the comparison covers varied tokens, not one repeated id


def test_top_k_1_equals_greedy() -> None:
    model = _model()
    greedy = generate(model, [1, 2, 3], 30, temperature=0.0)
    assert generate(model, [1, 2, 3], 30, temperature=1.5, top_k=1, seed=123) == greedy


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize("top_p, kept", [
    (0.45, {2}),           # 0.5 alone reaches 0.45
    (0.75, {2, 0}),        # 0.5 < 0.75 <= 0.5 + 0.3
    (0.81, {2, 0, 4}),     # 0.8 < 0.81 <= 0.95
    (0.96, {2, 0, 4, 1}),  # 0.95 < 0.96 <= 0.99
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    logits = _logits_from_probs([0.3, 0.04, 0.5, 0.01, 0.15])  # order: 2, 0, 4, 1, 3
    out = filter_logits(logits, top_p=top_p)
    assert {i for i in range(5) if torch.isfinite(out[i])} == kept
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])  # kept logits are untouched


def test_top_p_per_row_and_with_top_k() -> None:
    logits = torch.stack([_logits_from_probs([0.3, 0.04, 0.5, 0.01, 0.15]),
                          _logits_from_probs([0.22, 0.05, 0.33, 0.12, 0.28])])
    out = filter_logits(logits, top_p=0.75)  # row 2: 0.33 + 0.28 < 0.75 <= 0.33 + 0.28 + 0.22
    assert torch.isfinite(out).tolist() == [[True, False, True, False, False],
                                            [True, False, True, False, True]]
    out = filter_logits(logits, top_k=2, top_p=0.99)
    assert torch.isfinite(out).sum(-1).tolist() == [2, 2]


def test_sampling_stays_inside_the_nucleus() -> None:
    logits = _logits_from_probs([0.3, 0.04, 0.5, 0.01, 0.15]).float().expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, temperature=1.0, top_p=0.75, generator=g)
    counts = torch.bincount(ids, minlength=5).tolist()
    assert counts[1] == counts[3] == counts[4] == 0
    assert abs(counts[2] / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the kept mass


def test_eos_stops_generation() -> None:
    model = _model()
    free = generate(model, [7, 8], 30, temperature=0.0)
    eos = free[5]
    cut = free.index(eos)
    assert generate(model, [7, 8], 30, temperature=0.0, eos_id=eos) == free[:cut]
    assert list(generate_stream(model, [7, 8], 30, temperature=0.0, eos_id=eos)) == free[:cut]
    assert generate(model, [7, 8], 30, temperature=0.0, eos_id=free[0]) == []


def test_eos_in_a_batch_pads_finished_rows() -> None:
    model = _model()
    prompts = [[7, 8], [40, 41]]
    free = [generate(model, p, 20, temperature=0.0) for p in prompts]
    eos = free[0][4]
    got = generate(model, prompts, 20, temperature=0.0, eos_id=eos)
    assert got == [f[:f.index(eos)] if eos in f else f for f in free]
    for step in generate_stream(model, prompts, 20, temperature=0.0, eos_id=eos):
        assert isinstance(step, list) and len(step) == 2


def test_seed_reproducibility() -> None:
    model = _model()
    a = generate(model, [1, 2], 30, temperature=1.0, seed=7)
    assert generate(model, [1, 2], 30, temperature=1.0, seed=7) == a
    assert generate(model, [1, 2], 30, temperature=1.0, seed=8) != a


def test_batch_equals_each_prompt_alone() -> None:
    model = _model()
    prompts = [[1, 2, 3], [50, 9, 4], [96, 96, 0]]
    batch = generate(model, prompts, 25, temperature=0.0)
    assert batch == [generate(model, p, 25, temperature=0.0) for p in prompts]


def test_errors_are_clear() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(5\) = 65 exceeds .*64"):
        generate(model, list(range(60)), 5)
    assert len(generate(model, list(range(60)), 4, temperature=0.0)) == 4  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="equal length"):
        generate(model, [[1, 2], [3]], 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)


def test_streaming_yields_the_same_ids_as_generate() -> None:
    model = _model()
    stream = generate_stream(model, [3, 4, 5], 20, temperature=0.8, top_k=10, seed=1)
    first = next(stream)
    assert isinstance(first, int)
    assert [first, *stream] == generate(model, [3, 4, 5], 20, temperature=0.8, top_k=10, seed=1)


def test_generate_restores_training_mode() -> None:
    model = _model().train()
    generate(model, [1], 3, temperature=0.0)
    assert model.training


@pytest.mark.parametrize("n_heads, n_kv_heads, tie", [(4, 4, True), (4, 2, False)], ids=["mha", "gqa"])
def test_static_decode_gives_the_kv_path_tokens(n_heads: int, n_kv_heads: int, tie: bool) -> None:
    """The path generate takes on CUDA (static-shape step; its CUDA graph capture only on CUDA) == the KV path,
    greedy and seeded sampling, one prompt and a batch; a wrapped layer falls back to the ordinary step."""
    model = _model(n_heads, n_kv_heads, tie)
    prompt, batch = [5, 17, 3, 60], [[5, 17, 3], [8, 1, 40]]
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=3)):
        kv = generate(model, prompt, 40, static_decode=False, **kw)
        assert generate(model, prompt, 40, static_decode=True, **kw) == kv
        assert generate(model, batch, 30, static_decode=True, eos_id=7, **kw) == generate(
            model, batch, 30, static_decode=False, eos_id=7, **kw)
    assert generate(model, prompt, 40, temperature=0.0) == _greedy_by_recompute(model, prompt, 40)  # CPU default

    from llamalit.model.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=["wq"]))
    assert decode_weights(model) is None
    assert generate(model, prompt, 10, temperature=0.0, static_decode=True) == _greedy_by_recompute(model, prompt, 10)


def test_static_decoder_captures_a_cuda_graph_only_on_cuda() -> None:
    from llamalit.inference.decode import StaticDecoder

    model = _model()
    weights = decode_weights(model, kernel=False)
    decoder = StaticDecoder(weights, model.new_caches(1), 1, torch.device("cpu"), graph=True)
    assert not decoder.want_graph
    with torch.inference_mode():
        model.hidden(torch.tensor([[5]]), 0, decoder.caches)
        decoder.step(torch.tensor([17]), 1)
    assert decoder.graph is None
    with pytest.raises(ValueError, match="past max_seq_len"):
        decoder.step(torch.tensor([1]), model.cfg.max_seq_len)
