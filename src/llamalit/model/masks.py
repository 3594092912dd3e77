"""Attention masks for packed rows: each token sees only earlier tokens of its own document.

``segments`` (B, T) numbers the documents of each packed row (``llamalit.data.packing``). Two layouts:
a dense (B, 1, T, T) boolean mask for SDPA (any device) or a flex-attention ``BlockMask`` (CUDA: the
blocks outside the block diagonal are skipped).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "flex", "dense")
FLEX_MIN_HEAD_DIM = 16  # flex attention's CUDA kernel needs head_dim >= 16 (stories260K and tiny have 8)


def check_backend(backend: str, head_dim: int | None = None) -> str:
    """``backend`` when it is one of :data:`BACKENDS` (and flex fits ``head_dim``); else a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"attention={backend!r}: choose auto, flex (CUDA) or dense")
    if backend == "flex" and head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"attention=flex: head_dim {head_dim} (model.dim / model.n_heads) is below the "
                         f"{FLEX_MIN_HEAD_DIM} flex attention's kernel needs; use attention=auto or dense")
    return backend


def resolve_backend(backend: str, device: torch.device, head_dim: int) -> str:
    """``backend`` with ``auto`` resolved: flex on CUDA when the heads are wide enough for its kernel, else dense."""
    if backend != "auto":
        return backend
    return "flex" if device.type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM else "dense"


def document_mask(segments: torch.Tensor, backend: str = "auto") -> torch.Tensor | BlockMask:
    """Causal attention within each document of packed rows; ``segments`` (B, T) numbers the documents.

    ``backend``: ``flex`` (a ``BlockMask``), ``dense`` (a (B, 1, T, T) boolean mask for SDPA), ``auto``
    (flex on CUDA, dense elsewhere: flex attention without a compiled kernel is a slow reference on the CPU).
    """
    if backend == "auto":
        backend = "flex" if segments.is_cuda else "dense"
    if backend == "dense":
        t = segments.shape[1]
        same = segments[:, None, :, None] == segments[:, None, None, :]
        return same & torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    if backend != "flex":
        raise ValueError(f"document_mask: backend={backend!r}; choose auto, flex or dense")
    if not segments.is_cuda and torch.is_grad_enabled():
        raise ValueError("attention=flex trains on CUDA only (flex attention has no backward on the CPU); "
                         "use attention=dense or auto here")
    if torch.compiler.is_compiling():  # traced into the caller's graph
        return _document_block_mask(segments)
    return _block_mask_builder(compiled=segments.is_cuda)(segments)


def _document_block_mask(segments: torch.Tensor) -> BlockMask:
    b, t = segments.shape

    def same_doc_causal(b_i, h_i, q_i, kv_i):  # noqa: ARG001 - flex's mask_mod signature
        return (segments[b_i, q_i] == segments[b_i, kv_i]) & (q_i >= kv_i)

    return create_block_mask(same_doc_causal, b, None, t, t, device=segments.device)


@functools.cache
def _block_mask_builder(compiled: bool):
    """The BlockMask builder, compiled on CUDA: eager ``create_block_mask`` evaluates the mask through vmap
    with many small ops, once per packed batch."""
    return torch.compile(_document_block_mask, dynamic=False) if compiled else _document_block_mask


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex attention of (B, H, T, D) q/k/v under ``block_mask``: traced as is inside a compiled graph,
    compiled on its own on CUDA when called eagerly (its fused kernel), the eager reference elsewhere."""
    # contiguous: inductor's CPU flex template cannot read the rotated views
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling() or not q.is_cuda:
        fn = flex_attention
    else:
        fn = _compiled_flex_attention()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
