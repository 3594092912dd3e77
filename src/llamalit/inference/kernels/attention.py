"""Attention for small heads on the CPU, fp32, by the compiled kernel (``llk_attention`` in decode_cpu.cpp).

PyTorch's CPU SDPA works in blocks of (row, head, 32 queries) and pays a fixed cost per block, which dominates
at the head sizes of the small presets (8 for stories260K): scoring spent a third of its time there. The kernel
transposes each (row, kv head)'s keys once, scores 16 keys per vector product and takes four queries at a time, so
each key and value it loads serves four (``scripts/bench_attention.py``: 1.7-3x SDPA at 8-dim heads, 1.1-1.7x at
48 and 64 on one thread). :func:`kernel_attention` makes a model's attention layers use it for inference within a
``with`` block (the harness's scoring forwards); everything else keeps SDPA.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llamalit.inference.kernels import kernel_enabled, load_decode_kernel

MAX_HEAD_DIM = 64  # the head sizes the kernel has vector code for (8 to 64) and beat SDPA at (bench_attention.py)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              threads: int | None = None) -> torch.Tensor | None:
    """``softmax(q k^T / sqrt(D) + mask) v`` for q (B, H, T, D) and k, v (B, KV, L, D) (H a multiple of KV):
    ``mask`` None is causal with the last query at the last key (query i sees keys up to L - T + i), else a
    bool mask of shape (1 or B, 1, 1 or T, L). Returns (B, H, T, D) (a view of a (B, T, H, D) tensor), or
    None when the kernel is not built or cannot take these tensors (not fp32 CPU, other layouts)."""
    lib = load_decode_kernel()
    if lib is None or q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return None
    b, h, t, d = q.shape
    kv, length = k.shape[1], k.shape[2]
    if (k.shape[0] != b or k.shape[3] != d or h % kv or b * t * length == 0
            or any(x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1 for x in (q, k, v))):
        return None
    mask_ptr, msb, mst = None, 0, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1:
            return None
        mask = mask.expand(mask.shape[0], 1, t, length)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_ptr, msb, mst = mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2)
    out = torch.empty(b, t, h, d)
    lib.llk_attention(q.data_ptr(), q.stride(0), q.stride(2), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                      k.stride(2), v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), mask_ptr, msb, mst,
                      length - t, out.data_ptr(), b, t, h, kv, length, d, ctypes.c_float(d ** -0.5),
                      threads or torch.get_num_threads())
    return out.transpose(1, 2)


@contextmanager
def kernel_attention(model: nn.Module, enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, ``model``'s attention layers (``attend_impl``) use :func:`attention` when the model is
    fp32 on the CPU, its heads have at most :data:`MAX_HEAD_DIM` dims, the kernel builds and ``enabled``
    (default: unless ``LLAMALIT_DECODE_KERNEL=0``) allows; yields whether they do. Training forwards and
    tensors the kernel cannot take keep SDPA."""
    layers = [m for m in model.modules() if hasattr(m, "attend_impl")]
    cfg = getattr(model, "cfg", None)
    use = (kernel_enabled(enabled) and bool(layers) and cfg is not None and cfg.head_dim <= MAX_HEAD_DIM
           and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
           and load_decode_kernel() is not None)
    before = [m.attend_impl for m in layers]
    try:
        if use:
            for m in layers:
                m.attend_impl = attention
        yield use
    finally:
        for m, impl in zip(layers, before):
            m.attend_impl = impl
