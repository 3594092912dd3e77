"""Log-likelihoods of many continuations, each context run once: what lm-eval's ``loglikelihood`` asks for.

:func:`score_continuations` takes requests as (``prefix``, ``suffix``, ``targets``): the model's input is
``prefix + suffix`` and ``targets`` are the last ``len(suffix) + 1`` tokens to score (each predicted by the token
before it: the first by the prefix's last token). Multiple-choice tasks ask the same context with several
continuations, so requests are grouped by prefix:

- a prefix shared by several distinct suffixes runs once; its keys and values (KV cache) are then copied to a
  row per suffix, and the suffixes run on top of them at their own RoPE positions, each seeing its prefix and
  its own earlier tokens (an explicit mask). Requests whose inputs are the same (single-token continuations
  differing only in the scored token) share one row.
- any other request runs whole, in right-padded causal rows sorted longest first (little padding).

The padding of those rows is left out of everything but attention (``Llama.hidden(lengths=...)``), the output head
runs only on the scored positions, and the sums and greedy checks are made in a few tensor ops
per batch. For an fp32 model on the CPU the compiled kernel takes attention (heads up to 64 dims,
:mod:`llamalit.inference.kernels.attention`) and the targets' log-probabilities
(:mod:`llamalit.inference.kernels.logprobs`). Results equal scoring each request alone up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from llamalit.inference.kernels.attention import kernel_attention
from llamalit.inference.kernels.logprobs import pick_logprobs
from llamalit.model.llama import KVCache, Llama


@dataclass
class _Group:
    """Requests with the same prefix: run whole (``shared`` False, one input) or prefix once + suffix rows."""

    prefix: tuple[int, ...]
    shared: bool
    rows: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # suffix -> request indices


def _groups(requests: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> list[_Group]:
    by_prefix: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (prefix, suffix, targets) in enumerate(requests):
        if not prefix or len(targets) != len(suffix) + 1:
            raise ValueError(f"request {i}: needs a non-empty prefix and len(targets) == len(suffix) + 1")
        by_prefix.setdefault(tuple(prefix), {}).setdefault(tuple(suffix), []).append(i)
    out = []
    for prefix, rows in by_prefix.items():
        if len(rows) > 1 and len(prefix) > 1:  # worth running the prefix once
            out.append(_Group(prefix, True, rows))
        else:  # each distinct input runs whole
            out += [_Group(prefix + suffix, False, {(): idx}) for suffix, idx in rows.items()]
    return out


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens.to(device)


def _starts(lengths: Sequence[int]) -> list[int]:
    """Where each row begins in the unpadded hidden states (the rows' real tokens one after another)."""
    return [0, *accumulate(lengths[:-1])]


@dataclass
class _Budget:
    """Rows per forward: ``rows``, or more while rows x width (padding included) stay within ``tokens``."""

    rows: int
    tokens: int | None = None

    def fits(self, rows: int, width: int) -> bool:
        return rows <= self.rows or (self.tokens is not None and rows * width <= self.tokens)


def _suffix_chunks(items: list[tuple[int, tuple[int, ...]]], lengths: list[int], limit: int,
                   budget: _Budget) -> list[list[tuple[int, tuple[int, ...]]]]:
    """(group slot, suffix) rows (longest suffix first) cut into chunks within ``budget`` whose longest prefix +
    longest suffix fit ``limit`` (the rows of a chunk share one cache width)."""
    chunks: list[list[tuple[int, tuple[int, ...]]]] = []
    width_p = width_s = 0
    for slot, suffix in items:
        p, s = max(width_p, lengths[slot]), max(width_s, len(suffix))
        if not chunks or not budget.fits(len(chunks[-1]) + 1, p + s) or p + s > limit:
            chunks.append([])
            p, s = lengths[slot], len(suffix)
        chunks[-1].append((slot, suffix))
        width_p, width_s = p, s
    return chunks


class _Batch:
    """Hidden states of one batch of groups (each forward's real tokens only), gathered at the scored positions."""

    def __init__(self, model: Llama, groups: list[_Group], scored: Sequence[int], budget: _Budget,
                 device: torch.device):
        self.model, self.groups, self.scored, self.budget, self.device = model, groups, scored, budget, device
        self.lengths = [len(g.prefix) for g in groups]
        self.flat: list[torch.Tensor] = []  # (N, dim) hidden states of each forward
        self.picks: dict[int, list[tuple[int, int]]] = {}  # request -> (forward, flat index) per scored token

    def run(self) -> None:
        cfg = self.model.cfg
        shared = [g.shared for g in self.groups]
        caches = None
        if any(shared):
            ref = self.model.output.weight
            caches = [KVCache(len(self.groups), cfg.n_kv_heads, max(self.lengths), cfg.head_dim, ref.dtype, ref.device)
                      for _ in range(cfg.n_layers)]
        tokens = _padded([g.prefix for g in self.groups], self.device)
        self.flat.append(self.model.hidden(tokens, 0, caches, lengths=torch.tensor(self.lengths, device=self.device)))
        starts = _starts(self.lengths)
        items = []
        for slot, g in enumerate(self.groups):
            last = starts[slot] + self.lengths[slot] - 1
            for suffix, idx in g.rows.items():
                n = 1 if g.shared else self.scored[idx[0]]  # a whole row holds every scored position
                for i in idx:
                    self.picks[i] = [(0, p) for p in range(last - n + 1, last + 1)]
                if g.shared and suffix:
                    items.append((slot, suffix))
        items.sort(key=lambda it: -len(it[1]))
        for chunk in _suffix_chunks(items, self.lengths, cfg.max_seq_len, self.budget):
            self._suffixes(chunk, caches)

    def _suffixes(self, chunk: list[tuple[int, tuple[int, ...]]], caches: list[KVCache]) -> None:
        """Run suffix rows on copies of their prefixes' cached keys and values."""
        dev, cfg = self.device, self.model.cfg
        slots = torch.tensor([slot for slot, _ in chunk], device=dev)
        starts = torch.tensor([self.lengths[slot] for slot, _ in chunk], device=dev)
        width_p = int(starts.max())
        tokens = _padded([s for _, s in chunk], dev)
        width_s, lengths = tokens.shape[1], [len(s) for _, s in chunk]
        ref = caches[0].k
        rows = []
        for cache in caches:
            row = KVCache(len(chunk), cfg.n_kv_heads, width_p + width_s, cfg.head_dim, ref.dtype, ref.device)
            row.k[:, :, :width_p] = cache.k[slots, :, :width_p]
            row.v[:, :, :width_p] = cache.v[slots, :, :width_p]
            rows.append(row)
        cols = torch.arange(width_s, device=dev)
        positions = starts[:, None] + cols[None]  # padding leaves (lengths) before the RoPE lookup
        sees_prefix = torch.arange(width_p, device=dev)[None, None, :] < starts[:, None, None]  # (B, 1, P)
        causal = torch.ones(width_s, width_s, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([sees_prefix.expand(-1, width_s, -1), causal.expand(len(chunk), -1, -1)], dim=2)
        forward = len(self.flat)
        self.flat.append(self.model.hidden(tokens, width_p, rows, positions=positions, mask=mask[:, None],
                                           lengths=torch.tensor(lengths, device=dev)))
        for (slot, suffix), start in zip(chunk, _starts(lengths)):
            for i in self.groups[slot].rows[suffix]:
                self.picks[i] += [(forward, start + p) for p in range(len(suffix))]


@torch.inference_mode()
def score_continuations(model: Llama, requests: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                        batch_size: int = 8, max_tokens: int | None = None,
                        autocast: Callable[[], AbstractContextManager] = nullcontext) -> list[tuple[float, bool]]:
    """(sum of log p(target), whether every target is the argmax) for each (prefix, suffix, targets) request.

    ``batch_size``: rows per forward (prefixes or whole inputs; then suffix rows); ``max_tokens``: more rows
    while rows x width stays within it (short inputs, fewer forwards). Every input must fit the model's
    context (cut it first). Log-softmax is taken in float32, the sums in float64 (float32 on MPS).
    """
    scored = [len(targets) for _, _, targets in requests]
    groups = sorted(_groups(requests), key=lambda g: (-len(g.prefix), g.prefix))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    budget = _Budget(batch_size, max_tokens)
    with kernel_attention(model):  # small heads on the CPU: the compiled attention (SDPA elsewhere)
        _score_groups(model, requests, groups, scored, budget, autocast, out)
    return out


def _score_groups(model: Llama, requests: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                  groups: list[_Group], scored: list[int], budget: _Budget,
                  autocast: Callable[[], AbstractContextManager], out: list[tuple[float, bool]]) -> None:
    """Fill ``out`` with each request's (sum, greedy), a batch of groups at a time."""
    device = model.output.weight.device
    start = 0
    while start < len(groups):
        width, end = len(groups[start].prefix), start + 1  # longest first: the first sets the width
        while end < len(groups) and budget.fits(end - start + 1, width):
            end += 1
        batch = _Batch(model, groups[start:end], scored, budget, device)
        start = end
        with autocast():
            batch.run()
            order = list(batch.picks)
            owner = torch.tensor([k for k, i in enumerate(order) for _ in batch.picks[i]], device=device)
            targets = torch.tensor([t for i in order for t in requests[i][2]], device=device)
            offsets = [0]
            for f in batch.flat:
                offsets.append(offsets[-1] + len(f))
            index = torch.tensor([offsets[fwd] + p for i in order for fwd, p in batch.picks[i]], device=device)
            logits = model.output(torch.cat(batch.flat).index_select(0, index))
        fused = pick_logprobs(logits, targets)  # fp32 on the CPU: two passes, no log-softmax tensor
        if fused is not None:
            picked, missed = fused[0], (~fused[1]).float()
        else:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(1, targets[:, None])[:, 0]
            missed = (logprobs.argmax(-1) != targets).float()
        wide = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.zeros(len(order), dtype=wide, device=device).index_add_(0, owner, picked.to(wide))
        misses = torch.zeros(len(order), device=device).index_add_(0, owner, missed)
        for i, total, miss in zip(order, sums.tolist(), misses.tolist()):
            out[i] = (total, miss == 0)
