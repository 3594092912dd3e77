"""score_continuations against scoring each request alone with a plain forward pass."""

from __future__ import annotations

import random

import pytest
import torch

from llamalit.inference.scoring import score_continuations
from llamalit.model.llama import Llama, ModelConfig


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=48)).eval()


def alone(model: Llama, prefix: list[int], suffix: list[int], targets: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prefix + suffix])), -1)[0, -len(targets):]
    t = torch.tensor(targets)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


def requests(seed: int, limit: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Multiple-choice-like groups (one context, several continuations, some of one token, some repeated),
    lone requests, and inputs as long as the model's context."""
    rng = random.Random(seed)
    toks = lambda n: [rng.randrange(64) for _ in range(n)]  # noqa: E731
    out = []
    for _ in range(7):
        context = toks(rng.randint(1, 30))
        for _ in range(rng.randint(1, 5)):
            cont = toks(rng.choice([1, 1, rng.randint(2, limit - len(context))]))
            out.append((context, cont[:-1], cont))
        out.append(out[-1])  # the same request twice
    out.append((toks(1), toks(limit - 1), toks(limit)))  # a continuation as long as the context
    out.append((toks(limit - 3), toks(2), toks(3)))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize(("batch_size", "max_tokens"), [(1, None), (2, None), (5, None), (1, 100)])
def test_scores_equal_each_request_alone(model, batch_size, max_tokens):
    reqs = requests(batch_size, model.cfg.max_seq_len)
    got = score_continuations(model, reqs, batch_size=batch_size, max_tokens=max_tokens)
    for req, (ll, greedy) in zip(reqs, got):
        want_ll, want_greedy = alone(model, *req)
        assert abs(ll - want_ll) < 1e-4
        assert greedy == want_greedy


def test_a_shared_context_runs_once(model):
    """Four continuations of a 30-token context: the context goes through the model once, each continuation
    but its last token once; single-token continuations of another context share one row."""
    seen = []
    hook = model.tok_embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    context, other = list(range(1, 31)), list(range(31, 41))
    conts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    reqs = [(context, c[:-1], c) for c in conts] + [(other, [], [t]) for t in (3, 4, 5)]
    try:
        got = score_continuations(model, reqs, batch_size=8)
    finally:
        hook.remove()
    tokens_run = sum(shape.numel() for shape in seen)  # the padding never reaches the embedding
    assert tokens_run == len(context) + len(other) + 2 + 1 + 3  # each prefix once, suffixes less their last token
    assert tokens_run < sum(len(p) + len(s) for p, s, _ in reqs)
    for req, answer in zip(reqs, got):
        assert abs(answer[0] - alone(model, *req)[0]) < 1e-4


def test_bad_request_is_refused(model):
    with pytest.raises(ValueError, match="request 0"):
        score_continuations(model, [([1, 2], [3], [3])])


def test_long_prefix_and_long_suffix_rows_go_to_separate_forwards(model, monkeypatch):
    """A 40-token context with short continuations beside a 3-token one with 40-token continuations: together
    wider than the model's context of 48, so their suffix rows run apart; scores still those of each alone."""
    rng = random.Random(1)
    toks = lambda n: [rng.randrange(64) for _ in range(n)]  # noqa: E731
    long_ctx, short_ctx = toks(40), toks(3)
    reqs = [(long_ctx, c[:-1], c) for c in (toks(3), toks(3))] + [(short_ctx, c[:-1], c) for c in (toks(41), toks(41))]
    widths, hidden = [], model.hidden

    def recording(tokens, *args, **kw):
        widths.append(tokens.shape[1])
        return hidden(tokens, *args, **kw)
    monkeypatch.setattr(model, "hidden", recording)
    got = score_continuations(model, reqs, batch_size=8)
    monkeypatch.undo()
    assert widths == [40, 40, 2]  # both prefixes, then each context's suffix rows on their own
    for req, (ll, greedy) in zip(reqs, got):
        want_ll, want_greedy = alone(model, *req)
        assert abs(ll - want_ll) < 1e-4 and greedy == want_greedy
