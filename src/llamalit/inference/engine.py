"""Continuous batching: concurrent requests share decode steps over one KV cache with a slot per request.

A background thread admits waiting requests into free slots (each prompt's prefill runs alone into its
slot, between two decode steps of the others), then runs one decode step for every active slot at once:
:meth:`~llamalit.inference.decode.DecodeWeights.static_step` with one RoPE position per row (a CUDA graph of the
whole slot batch on CUDA, :class:`~llamalit.inference.decode.StaticDecoder`), or, fp32 on the CPU wherever
``generate()`` takes it, the compiled step of :mod:`llamalit.inference.kernels` with each row at its own cache
column. Each request samples with its own settings and generator
(:func:`~llamalit.inference.generate.sample_next`), so its tokens are those of ``generate()`` run alone.
A slot is freed when its request reaches ``max_tokens`` or EOS, or is cancelled (a stop string, a client
that went away). Once every slot is taken and ``max_queue`` more requests wait, :meth:`Engine.submit` raises
:class:`QueueFull` (requests waiting for a slot that is free count as taking it: the loop admits them next).
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llamalit.inference.decode import StaticDecoder, decode_weights
from llamalit.inference.generate import check_sampling_args, filter_logits, sample_next
from llamalit.model import KVCache, Llama

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and ``max_queue`` requests already wait."""


@dataclass
class SamplingParams:
    """Per-request settings, as :func:`~llamalit.inference.generate.generate` takes them (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int = 0  # EOS is not picked before this many tokens (llama.cpp's and vLLM's ``min_tokens``)


@dataclass(eq=False)
class Request:
    """One generation. ``sink`` receives each new token id, then None when it ends (``finish_reason`` set)."""

    prompt_ids: list[int]
    params: SamplingParams
    eos_id: int | None
    sink: Callable[[int | None], None]
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled", "error"
    error: str | None = None
    n_generated: int = 0
    cancelled: bool = False
    slot: int | None = None
    pos: int = 0
    last: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the engine to end this request and free its slot (a no-op once it ended)."""
        self.cancelled = True


class _SlotCache:
    """A view of some rows of a :class:`~llamalit.model.KVCache` that the model's forward can write into."""

    update = KVCache.update

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


class Engine:
    """Serves :class:`Request` objects from ``slots`` KV-cache rows; see the module docstring."""

    def __init__(self, model: Llama, slots: int = 8, max_queue: int = 64, graph: bool | None = None):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots={slots}, max_queue={max_queue}: need slots >= 1 and max_queue >= 0")
        self.model = model.eval()
        self.device = model.output.weight.device
        self.slots, self.max_queue = slots, max_queue
        graph = self.device.type == "cuda" if graph is None else graph
        # fp32 on the CPU: the compiled step where generate() takes it (the same probe and switch)
        self.weights = decode_weights(model, kernel=None if self.device.type == "cpu" and not graph else False)
        if self.weights is None:
            raise ValueError("the engine needs plain nn.Linear projections: merge LoRA adapters first "
                             "(llamalit.lora.merge_lora)")
        self.caches = model.new_caches(slots)
        self._row_views: dict[int, list[_SlotCache]] = {}  # the first n slots' rows, the same objects each step
        self.positions = torch.arange(model.cfg.max_seq_len, device=self.device)
        self.static = StaticDecoder(self.weights, self.caches, slots, self.device, graph=True) if graph else None
        self.active: dict[int, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.finished: collections.Counter[str] = collections.Counter()
        self.steps = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- public API -------------------------------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llamalit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams, eos_id: int | None = None,
               sink: Callable[[int | None], None] | None = None) -> Request:
        """Queue a request; ValueError for bad settings or a prompt that leaves no room, QueueFull past the bound.

        Without ``sink``, read the tokens with :func:`tokens`.
        """
        check_sampling_args(params.max_tokens, params.temperature, params.top_k, params.top_p, params.seed)
        if not 0 <= params.min_tokens <= params.max_tokens:
            raise ValueError(f"min_tokens={params.min_tokens}: must be in [0, max_tokens={params.max_tokens}]")
        if not prompt_ids:
            raise ValueError("the prompt is empty; pass at least one token (e.g. BOS)")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed the "
                             f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens")
        req = Request(list(prompt_ids), params, eos_id, sink or _QueueSink())
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            # slots + max_queue requests in all: one per slot, max_queue more (not yet admitted ones may hold a
            # free slot: the loop thread admits between decode steps, later under load)
            if len(self.active) + len(self.waiting) >= self.slots + self.max_queue:
                raise QueueFull(f"server busy: all {self.slots} slots are taken and "
                                f"{len(self.active) + len(self.waiting) - self.slots} request(s) wait "
                                f"(max_queue={self.max_queue}); retry later")
            self.waiting.append(req)
            self._cond.notify_all()
        return req

    def stats(self) -> dict:
        with self._cond:
            return {"slots": self.slots, "active": len(self.active), "waiting": len(self.waiting),
                    "max_queue": self.max_queue, "steps": self.steps, "finished": dict(self.finished)}

    # -- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.active:
                    self._cond.wait()
                if self._closed:
                    break
                admitted = []
                free = [s for s in range(self.slots) if s not in self.active]
                while self.waiting and free:
                    req = self.waiting.popleft()
                    if req.cancelled:
                        self._finish(req, "cancelled")
                        continue
                    req.slot = free.pop(0)
                    self.active[req.slot] = req
                    admitted.append(req)
            try:
                with torch.inference_mode():
                    for req in admitted:
                        self._prefill(req)
                    self._drop_cancelled()
                    if self.active:
                        self._decode()
            except Exception as e:  # a failed step ends the requests in it; the engine keeps serving
                log.exception("engine step failed")
                with self._cond:
                    for req in list(self.active.values()):
                        req.error = f"{type(e).__name__}: {e}"
                        self._finish(req, "error")
        with self._cond:
            for req in list(self.active.values()) + list(self.waiting):
                self._finish(req, "cancelled")
            self.waiting.clear()

    def _prefill(self, req: Request) -> None:
        s = req.slot
        views = [_SlotCache(c.k[s:s + 1], c.v[s:s + 1]) for c in self.caches]
        tokens = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model.output(self.model.hidden(tokens, 0, views)[:, -1])
        req.pos = len(req.prompt_ids)
        if req.params.temperature != 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.params.seed if req.params.seed is not None else random.getrandbits(63))
        self._hold_eos([req], logits, row=False)
        self._take(req, logits)

    def _decode(self) -> None:
        reqs = sorted(self.active.values(), key=lambda r: r.slot)
        rows = self.slots if self.static is not None else reqs[-1].slot + 1  # free rows in between: garbage
        tok, pos = [0] * rows, [0] * rows  # a free row writes its position 0, which its next prefill overwrites
        for r in reqs:
            tok[r.slot], pos[r.slot] = r.last, r.pos
        tok_t = torch.tensor(tok, dtype=torch.long, device=self.device)
        if self.static is not None:
            logits = self.static.step(tok_t, pos)
        elif self.weights.kernel is not None:  # each row at its own column, attending to its own keys
            logits = self.weights.kernel.step(tok_t, torch.tensor(pos), self._first_rows(rows))
        else:
            keys = max(pos) + 1  # eager: attend over the keys some row can see, not the whole context
            views = [_SlotCache(c.k[:rows, :, :keys], c.v[:rows, :, :keys]) for c in self.caches]
            pos_t = torch.tensor(pos, dtype=torch.long, device=self.device)
            logits = self.weights.static_step(tok_t, pos_t, views, self.positions[:keys])
        self.steps += 1
        self._hold_eos(reqs, logits)
        picked = self._sample(reqs, logits)
        for r in reqs:
            r.pos += 1
            self._take(r, logits[r.slot:r.slot + 1], picked[r.slot])

    def _first_rows(self, n: int) -> list[_SlotCache]:
        """Views of the caches' first ``n`` rows (contiguous), kept so the kernel's binding is reused."""
        views = self._row_views.get(n)
        if views is None:
            views = self._row_views[n] = [_SlotCache(c.k[:n], c.v[:n]) for c in self.caches]
        return views

    @staticmethod
    def _hold_eos(reqs: list[Request], logits: torch.Tensor, row: bool = True) -> None:
        """EOS out of the running (in place) for each request short of its ``min_tokens``."""
        for r in reqs:
            if r.eos_id is not None and r.n_generated < r.params.min_tokens:
                logits[r.slot if row else 0, r.eos_id] = float("-inf")

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> dict[int, int]:
        """Next token per slot: argmax rows at once; sampled rows filtered and softmaxed together per
        (top_k, top_p), then drawn each with its own generator, as :func:`sample_next` draws them."""
        picked = {}
        greedy = [r for r in reqs if r.params.temperature == 0]
        if greedy:
            best = logits.argmax(dim=-1).tolist()
            picked.update({r.slot: best[r.slot] for r in greedy})
        groups: dict[tuple, list[Request]] = {}
        for r in reqs:
            if r.params.temperature != 0:
                groups.setdefault((r.params.top_k, r.params.top_p), []).append(r)
        for (top_k, top_p), group in groups.items():
            rows = torch.tensor([r.slot for r in group], device=logits.device)
            temps = torch.tensor([[r.params.temperature] for r in group], device=logits.device)
            probs = torch.softmax(filter_logits(logits.index_select(0, rows).float() / temps, top_k, top_p), dim=-1)
            for i, r in enumerate(group):
                picked[r.slot] = int(torch.multinomial(probs[i:i + 1], 1, generator=r.generator))
        return picked

    def _take(self, req: Request, logits: torch.Tensor, picked: int | None = None) -> None:
        """Hand over ``req``'s next token (``picked``, else sampled from its logits (1, vocab)) and end the
        request when due."""
        p = req.params
        if picked is not None:
            nxt = picked
        elif p.temperature == 0:
            nxt = int(logits.argmax(dim=-1))
        else:
            nxt = int(sample_next(logits, p.temperature, p.top_k, p.top_p, req.generator))
        if req.eos_id is not None and nxt == req.eos_id:
            self._finish(req, "stop")
            return
        req.last = nxt
        req.n_generated += 1
        req.sink(nxt)
        if req.n_generated >= p.max_tokens:
            self._finish(req, "length")

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.active.values() if r.cancelled]:
            self._finish(req, "cancelled")

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        if req.slot is not None and self.active.get(req.slot) is req:
            del self.active[req.slot]
        self.finished[reason] += 1
        req.sink(None)


class _QueueSink:
    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()

    def __call__(self, item: int | None) -> None:
        self.queue.put(item)


def tokens(req: Request, timeout: float | None = 300.0) -> Iterator[int]:
    """The token ids of a request submitted without a sink, as they come (blocking)."""
    sink = req.sink
    if not isinstance(sink, _QueueSink):
        raise TypeError("tokens(): the request was submitted with its own sink")
    while True:
        item = sink.queue.get(timeout=timeout)
        if item is None:
            return
        yield item
