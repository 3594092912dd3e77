"""One-token decoding for generation: weight layouts, the decode step, and a CUDA-graph step.

:func:`decode_step` is ``model(tokens, pos, caches)[:, -1]`` for one new token per row, faster: the
compiled CPU kernel (``llamalit.inference.kernels``, fp32), else fused qkv and w1|w3 products on contiguous
transposed copies (:class:`DecodeWeights`). On CUDA, :class:`StaticDecoder` runs the same step with
static shapes (the position is a device tensor, attention covers the whole cache under a mask) and
replays it from a CUDA graph: one launch a token instead of one per kernel.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from llamalit.inference.kernels import DecodeKernel, load_decode_kernel
from llamalit.inference.kernels.select import kernel_threads, register_decode_weights, use_kernel
from llamalit.model.llama import KVCache, Llama, RMSNorm, _at_least_fp32


def decode_weights(model: Llama, kernel: bool | None = None) -> DecodeWeights | None:
    """Weight copies of ``model`` laid out for :func:`decode_step`, cached until a weight changes.

    fp32 on the CPU with ``kernel`` on: packed for the compiled step of ``llamalit.inference.kernels``
    (None: ``LLAMALIT_DECODE_KERNEL`` 1 or 0, else the faster of the two on this machine, timed once and
    cached: ``llamalit.inference.kernels.select``; no compiler: the PyTorch layout). Otherwise
    fused, pre-transposed copies for the PyTorch step. None when a projection is not a plain
    ``nn.Linear`` (e.g. LoRA-wrapped): then :func:`decode_step` runs the ordinary forward.
    """
    plain = all(type(m) is nn.Linear for layer in model.layers
                for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                          layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2,
                          layer.feed_forward.w3)) and type(model.output) is nn.Linear
    if not plain:
        return None
    params = list(model.parameters())
    asked, kernel = kernel, use_kernel(kernel, model)
    cached = model.__dict__.get("_decode_weights")
    if cached is None or not cached.matches(params) or cached.kernel_requested != kernel:
        cached = None
        model.__dict__.pop("_decode_weights", None)  # free the old copies before building new ones
        cached = DecodeWeights(model, kernel)
        model.__dict__["_decode_weights"] = cached  # a plain attribute: not in state_dict
        if cached.kernel is not None:
            cached.kernel.threads = kernel_threads(asked)
    return cached


def decode_step(model: Llama, tokens: torch.Tensor, pos: int, caches: list[KVCache],
                weights: DecodeWeights | None = None) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row (B, 1) at position ``pos``, appending to caches.

    Same result as ``model(tokens, pos, caches)[:, -1]`` up to float rounding.
    """
    if weights is None:
        weights = decode_weights(model)
    fast = weights is not None and not model.training and tokens.shape[1] == 1
    if fast and pos >= model.cfg.max_seq_len:
        raise ValueError(f"position {pos} is past max_seq_len={model.cfg.max_seq_len}")
    if fast and weights.kernel is not None:  # no autograd here: no grad-mode switch per token
        logits = weights.kernel.try_step(tokens[:, 0], pos, caches)
        if logits is not None:
            return logits
        fast = False  # caches the kernel cannot use (e.g. another dtype): the ordinary forward
    with torch.no_grad():
        if not fast:
            return model.output(model.hidden(tokens, pos, caches)[:, -1])
        return weights.step(tokens[:, 0], pos, caches)


def greedy_kernel(model: Llama, weights: DecodeWeights | None) -> DecodeKernel | None:
    """The compiled kernel whose :meth:`~llamalit.inference.kernels.DecodeKernel.greedy` step can replace
    ``decode_step`` + argmax for ``model`` (fp32 CPU, kernel on, not training); else None."""
    if weights is None or weights.kernel is None or model.training:
        return None
    return weights.kernel


class DecodeWeights:
    """Weight copies laid out for one-token decoding; built by :func:`decode_weights`."""

    def __init__(self, model: Llama, kernel: bool = True):
        cfg = model.cfg
        # what the copies were made from: the same tensor objects, storage and in-place version
        self.sources = [(weakref.ref(p), p.data_ptr(), p._version) for p in model.parameters()]
        self.cfg = cfg
        self.kernel_requested = kernel
        self.fp32 = model.output.weight.dtype == torch.float32
        self.kernel = self._build_kernel(model) if kernel else None
        self.embed = model.tok_embeddings  # the module: its hooks see the decoded tokens
        self.layers = []
        if self.kernel is not None:  # it holds the only copy needed
            return
        with torch.no_grad():
            for layer in model.layers:
                a, f = layer.attention, layer.feed_forward
                self.layers.append((
                    layer.attention_norm,
                    torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t().contiguous(),
                    a.wo.weight.t().contiguous(),
                    layer.ffn_norm,
                    torch.cat([f.w1.weight, f.w3.weight]).t().contiguous(),
                    f.w2.weight,  # (dim, hidden) rows: the dot-product gemv is the faster one here
                ))
            self.norm = model.norm
            self.output_t = model.output.weight.t().contiguous()
        self.rot = torch.complex(model.freqs_cos, model.freqs_sin)

    @staticmethod
    def _build_kernel(model: Llama) -> DecodeKernel | None:
        """The compiled step over packed copies; None unless all fp32 on the CPU and the kernel builds."""
        if not all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
            return None
        lib = load_decode_kernel()
        if lib is None:
            return None
        cfg = model.cfg
        layers = []
        with torch.no_grad():
            for layer in model.layers:
                a, f = layer.attention, layer.feed_forward
                layers.append((layer.attention_norm.weight, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]),
                               a.wo.weight, layer.ffn_norm.weight, torch.cat([f.w1.weight, f.w3.weight]),
                               f.w2.weight))
        return DecodeKernel(lib, dim=cfg.dim, hidden=cfg.hidden_dim, n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads, eps=cfg.norm_eps, embedding=model.tok_embeddings.weight,
                            layers=layers, norm=model.norm.weight, output=model.output.weight,
                            cos=model.freqs_cos, sin=model.freqs_sin)

    def matches(self, params: list[nn.Parameter]) -> bool:
        """True while ``params`` are the tensors the copies were made from, unmodified."""
        return len(params) == len(self.sources) and all(
            ref() is p and ptr == p.data_ptr() and version == p._version
            for p, (ref, ptr, version) in zip(params, self.sources))

    def _norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        if self.fp32:  # one fused kernel; RMSNorm's float() casts are no-ops here
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm(x)

    def step(self, tok: torch.Tensor, pos: int, caches: list[KVCache], rope_pos: torch.Tensor | None = None,
             visible: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tok`` (B,) written at cache column ``pos``; left-padded rows give each row's RoPE position
        (``rope_pos``, (B,)) and the keys it sees (``visible``, (B, 1, 1, pos + 1) bool)."""
        cfg = self.cfg
        b, hd, nh, nkv = tok.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        k_end = (nh + nkv) * hd
        # cos + i sin: RoPE on adjacent pairs is a complex product
        rot = self.rot[pos] if rope_pos is None else self.rot[rope_pos][:, None]
        x = self.embed(tok)  # (B, dim)
        for (attn_norm, wqkv, wo, ffn_norm, w13, w2), cache in zip(self.layers, caches):
            qkv = self._norm(x, attn_norm) @ wqkv
            qk = torch.view_as_complex(_at_least_fp32(qkv[:, :k_end]).unflatten(-1, (nh + nkv, hd // 2, 2)))
            qk = torch.view_as_real(qk * rot).flatten(-2).type_as(x)  # (B, nh + nkv, hd)
            cache.k[:, :, pos] = qk[:, nh:]
            cache.v[:, :, pos] = qkv[:, k_end:].view(b, nkv, hd)
            out = F.scaled_dot_product_attention(qk[:, :nh, None], cache.k[:, :, :pos + 1], cache.v[:, :, :pos + 1],
                                                 attn_mask=visible, enable_gqa=nh != nkv)
            x = x + out.view(b, nh * hd) @ wo
            h1, h3 = (self._norm(x, ffn_norm) @ w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(h1) * h3, w2)
        return self._norm(x, self.norm) @ self.output_t


    def static_step(self, tok: torch.Tensor, pos: torch.Tensor, caches: list[KVCache],
                    positions: torch.Tensor) -> torch.Tensor:
        """:meth:`step` with static shapes: ``pos`` a device tensor, one position for all rows (1,) or one
        per row (B,); attention over the whole cache with each row's keys past its ``pos`` masked
        (``positions``: ``arange(max_seq_len)``). No host sync."""
        cfg = self.cfg
        b, hd, nh, nkv = tok.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        k_end = (nh + nkv) * hd
        rot = self.rot.index_select(0, pos)[:, None]  # (1 or B, 1, hd/2)
        visible = (positions[None] <= pos[:, None])[:, None, None]  # (1 or B, 1, 1, max_seq_len): keys up to pos
        rows = torch.arange(b, device=tok.device)
        x = self.embed(tok)
        for (attn_norm, wqkv, wo, ffn_norm, w13, w2), cache in zip(self.layers, caches):
            qkv = self._norm(x, attn_norm) @ wqkv
            qk = torch.view_as_complex(_at_least_fp32(qkv[:, :k_end]).unflatten(-1, (nh + nkv, hd // 2, 2)))
            qk = torch.view_as_real(qk * rot).flatten(-2).type_as(x)
            cache.k[rows, :, pos] = qk[:, nh:]  # row r's keys at its own position
            cache.v[rows, :, pos] = qkv[:, k_end:].view(b, nkv, hd)
            out = F.scaled_dot_product_attention(qk[:, :nh, None], cache.k, cache.v, attn_mask=visible,
                                                 enable_gqa=nh != nkv)
            x = x + out.view(b, nh * hd) @ wo
            h1, h3 = (self._norm(x, ffn_norm) @ w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(h1) * h3, w2)
        return self._norm(x, self.norm) @ self.output_t


register_decode_weights(lambda model, kernel: DecodeWeights(model, kernel=kernel))


class StaticDecoder:
    """One-token steps of a fixed batch with static shapes, replayed from a CUDA graph when ``graph``.

    Built after the prefill filled ``caches``; :meth:`step` writes the token and its position into the
    captured input buffers and returns the logits buffer (overwritten by the next step: use it first).
    Same tokens as :func:`decode_step`; ``graph=False`` runs the static step eagerly (any device).
    """

    def __init__(self, weights: DecodeWeights, caches: list[KVCache], batch: int, device: torch.device,
                 graph: bool):
        if weights.kernel is not None:
            raise ValueError("StaticDecoder needs the PyTorch weight layout (decode_weights(model, kernel=False))")
        self.weights, self.caches = weights, caches
        self.tok = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.arange(weights.cfg.max_seq_len, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.want_graph = graph and device.type == "cuda"
        self.logits: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        return self.weights.static_step(self.tok, self.pos, self.caches, self.positions)

    def _capture(self) -> None:
        # warm-up on a side stream, as CUDA graph capture requires; its cache writes are the same ones the
        # first replay makes (same token, same position)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local capture, as torch's own graph code does: loader threads may still run (the sample
        # callback decodes at validation end), and global mode would fail on their CUDA calls
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._run()

    def step(self, tokens: torch.Tensor, pos: int | list[int]) -> torch.Tensor:
        """Logits (B, vocab) of ``tokens`` (B,) at position ``pos`` (one for all rows, or a list: one per
        row), appending to the caches."""
        last = max(pos) if isinstance(pos, list) else pos
        if last >= self.weights.cfg.max_seq_len:
            raise ValueError(f"position {last} is past max_seq_len={self.weights.cfg.max_seq_len}")
        self.tok.copy_(tokens)
        if isinstance(pos, list):
            self.pos.copy_(torch.tensor(pos, dtype=torch.long))
        else:
            self.pos.fill_(pos)
        if not self.want_graph:
            return self._run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
