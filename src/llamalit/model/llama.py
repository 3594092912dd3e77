"""The llama2.c Llama: RMSNorm, RoPE on adjacent pairs, GQA, SwiGLU, SDPA, tied embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from llamalit.model.losses import IGNORE_INDEX, LossOutput, linear_cross_entropy, logits_cross_entropy
from llamalit.model.masks import FLEX_MIN_HEAD_DIM, attend, check_backend, document_mask, resolve_backend

__all__ = ["FLEX_MIN_HEAD_DIM", "IGNORE_INDEX", "KVCache", "Llama", "ModelConfig", "RMSNorm", "TransformerBlock",
           "Unpadded", "apply_rope", "counted_positions", "document_mask", "rope_tables"]

_PRESETS: dict[str, dict] = {
    # Shapes of the llama2.c releases; stories260K uses multiple_of=4.
    "stories260k": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                        multiple_of=4, max_seq_len=512),
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                       multiple_of=32, max_seq_len=256),
    "stories42m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000,
                       multiple_of=32, max_seq_len=1024),
    "stories110m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        multiple_of=32, max_seq_len=1024),
    # A few thousand parameters with GQA, for tests and the offline demo's smoke runs.
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                 multiple_of=8, max_seq_len=128),
}


@dataclass
class ModelConfig:
    """Shape of a Llama. ``hidden_dim`` and ``n_kv_heads`` are derived as llama2.c does when None."""

    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int | None = None
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                     "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ModelConfig: {name}={value!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout={self.dropout} must be in [0, 1)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named shape (``stories260k``, ``stories15m``, ``stories42m``, ``stories110m``, ``tiny``)."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. Hydra extras)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision input; float32/float64 unchanged (``.float()`` would round float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def counted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``labels.flatten()``) of the positions whose label is not IGNORE_INDEX."""
    return (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def rope_tables(head_dim: int, end: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (end, head_dim // 2), float32, as llama2.c computes them."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, T, H, D); cos/sin are (T, D/2) or (B, T, D/2)."""
    xf = _at_least_fp32(x)
    if torch.compiler.is_compiling() or x.device.type == "mps":
        # Inductor fuses the real form into one kernel, while complex tensors break its graph (MPS lacks them).
        xr, xi = xf.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    else:  # eager: one complex multiply instead of eight element-wise kernels (6-30x faster on CPU)
        pairs = torch.view_as_complex(xf.contiguous().reshape(*x.shape[:-1], -1, 2))
        out = torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2))
    return out.flatten(-2).type_as(x)


class Unpadded:
    """Right-padded rows (B, T) with their padding left out: the N real tokens, row after row.

    Norms, linears and SwiGLU act on each position alone, so they run on (N, dim) and skip the padding's work;
    attention alone needs the rows, so :meth:`pad` scatters queries, keys and values back into (B, T, ...) (zeros
    where the padding was: a real token never attends to them, as the padding comes after it).
    """

    def __init__(self, lengths: torch.Tensor, width: int):
        self.shape = (len(lengths), width)
        cols = torch.arange(width, device=lengths.device)
        self.index = (cols[None, :] < lengths[:, None]).flatten().nonzero().squeeze(1)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(*self.shape, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (batch, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # inference only: (q, k, v, mask) -> output or None (then SDPA), with SDPA's mask semantics and mask None
        # causal; set for a ``with`` block by llamalit.inference.kernels.attention.kernel_attention
        self.attend_impl: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int = 0,
                mask: torch.Tensor | None = None, unpadded: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, dim), or (N, dim) with ``unpadded`` (cos/sin then per token, (N, D/2))."""
        rows = x.shape[:-1]
        q = apply_rope(self.wq(x).view(*rows, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(*rows, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(*rows, self.n_kv_heads, self.head_dim)
        if unpadded is not None:
            q, k, v = unpadded.pad(q), unpadded.pad(k), unpadded.pad(v)
        b, t = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        if self.attend_impl is not None and not self.training and not isinstance(mask, BlockMask):
            out = self.attend_impl(q, k, v, mask)
            if out is not None:
                return self._project(out, unpadded)
        if isinstance(mask, BlockMask):  # packed rows on CUDA: flex attention skips the masked-out blocks
            out = attend(q, k, v, mask, enable_gqa=self.n_kv_heads != self.n_heads)
            return self._project(out, unpadded)
        is_causal = False
        if mask is None and t > 1:
            if k.shape[2] == t:
                is_causal = True
            else:  # a chunk appended to a cache: query i sees keys up to start_pos + i
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(start_pos)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self._project(out, unpadded)

    def _project(self, out: torch.Tensor, unpadded: Unpadded | None) -> torch.Tensor:
        """Heads (B, H, T, D) joined and through ``wo``, on the real tokens only when ``unpadded``."""
        out = out.transpose(1, 2).flatten(2)
        return self.resid_dropout(self.wo(out if unpadded is None else unpadded.unpad(out)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, start_pos=0, mask=None, unpadded=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, mask, unpadded)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Decoder-only Llama with llama2.c's parameter names, so its state dicts load unchanged.

    ``attention``: how packed rows are masked (``llamalit.model.masks``): ``auto`` (flex on CUDA when the heads
    are wide enough, dense SDPA otherwise; resolved per device at forward time), ``flex`` or ``dense``.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention_backend = check_backend(attention, cfg.head_dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.tok_embeddings.weight = self.output.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def mask_backend(self, device: torch.device) -> str:
        """The :func:`~llamalit.model.masks.document_mask` backend for packed rows on ``device``."""
        return resolve_backend(self.attention_backend, device, self.cfg.head_dim)

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None,
               positions: torch.Tensor | None = None, mask: torch.Tensor | BlockMask | None = None,
               segments: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim).

        Packed rows: ``positions`` (B, T) are each token's RoPE position within its document and ``segments``
        (B, T) number the documents, so each token attends only to earlier tokens of its own document
        (:func:`document_mask`; ``mask`` overrides it).

        Right-padded rows: ``lengths`` (B,) are the rows' real lengths; everything but attention then skips the
        padding (:class:`Unpadded`) and the result is (N, dim), the rows' real tokens one row after another.
        """
        t = tokens.shape[1]
        if segments is not None and mask is None:
            mask = document_mask(segments, self.mask_backend(segments.device))
        if start_pos + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        unpadded = None if lengths is None else Unpadded(lengths, t)
        if unpadded is not None:
            if positions is None:
                positions = torch.arange(start_pos, start_pos + t, device=tokens.device).expand(len(tokens), -1)
            positions, tokens = unpadded.unpad(positions), unpadded.unpad(tokens)
        if positions is None:
            cos, sin = self.freqs_cos[start_pos:start_pos + t], self.freqs_sin[start_pos:start_pos + t]
        else:
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, caches[i] if caches is not None else None, start_pos, mask, unpadded)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for every position."""
        return self.output(self.hidden(tokens, start_pos, caches))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
        """Mean next-token cross-entropy over counted positions (labels already aligned to tokens)."""
        return self.loss_and_correct(tokens, labels, **kw).loss

    def loss_and_correct(self, tokens: torch.Tensor, labels: torch.Tensor, accuracy: bool = False,
                         loss_impl: str = "auto", counted: torch.Tensor | None = None, **kw) -> LossOutput:
        """Mean cross-entropy over counted positions and (``accuracy``) how many argmaxes hit the label.

        ``loss_impl`` (``llamalit.model.losses``): ``compiled`` runs the head and the loss on every position with
        IGNORE_INDEX labels masked out (static shapes: one graph under ``torch.compile``); the others run
        them on the counted positions only (``counted``: their flat indices, :func:`counted_positions`,
        computed on the host so the device never has to count). A LoRA-wrapped head goes through its own
        forward (its dropout acts on the input).
        """
        h, targets = self.hidden(tokens, **kw).flatten(0, 1), labels.flatten()
        if loss_impl != "compiled":
            counted = counted_positions(labels) if counted is None else counted
            h, targets = h.index_select(0, counted), targets.index_select(0, counted)
        if type(self.output) is nn.Linear:
            return linear_cross_entropy(h, self.output.weight, targets, impl=loss_impl, accuracy=accuracy)
        return logits_cross_entropy(self.output(h), targets, accuracy)

    def new_caches(self, batch: int, dtype: torch.dtype | None = None, length: int | None = None) -> list[KVCache]:
        """Fresh per-layer KV caches of ``length`` positions (default max_seq_len: what the decode kernel needs)."""
        ref = self.output.weight
        return [
            KVCache(batch, self.cfg.n_kv_heads, length or self.cfg.max_seq_len, self.cfg.head_dim,
                    dtype or ref.dtype, ref.device)
            for _ in range(self.cfg.n_layers)
        ]

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; a 4-bit (bitsandbytes) weight counts as its original shape, not its packed bytes."""
        def count(p: torch.Tensor) -> int:
            state = getattr(p, "quant_state", None)
            return math.prod(state.shape) if state is not None else p.numel()

        return sum(count(p) for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x params + 12 x layers x dim x seq_len (PaLM appendix B)."""
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.dim * seq_len
