"""karpathy/llama2.c checkpoints: the PyTorch ``ckpt.pt`` dict and the ``.bin`` files v0, v1, v2.

Layouts are in docs FORMATS.md. The writers give byte for byte what llama2.c's ``export.py``
writes for the same weights (v0's RoPE tables are recomputed and may differ in the last bit).
Our parameter names are llama2.c's, so its state dicts load unchanged.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from llamalit.checkpoints.common import (
    CheckpointError,
    check_state_dict,
    describe_keys,
    model_from_state_dict,
    safe_torch_load,
    strip_prefix,
)
from llamalit.model.llama import Llama, ModelConfig, rope_tables
from llamalit.utils.fileio import atomic_path

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
HEADER_BYTES = 256
_HEADER7 = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len
_COMPILE_PREFIX = "_orig_mod."
# What the C programs hard-code: any other value cannot be expressed in a .bin file.
LLAMA2C_NORM_EPS = 1e-5
LLAMA2C_ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------------
# the PyTorch checkpoint (ckpt.pt, stories15M.pt ...)


def load_llama2c_pt(path: str | Path) -> Llama:
    """Load llama2.c's ``torch.save`` dict (``model`` state dict + ``model_args``)."""
    path = Path(path)
    ckpt = safe_torch_load(path)
    expected = "a llama2.c .pt is a dict with 'model' (a state dict of tensors) and 'model_args' (a dict)"
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint: {expected}; found {describe_keys(ckpt)}")
    sd = strip_prefix(check_state_dict(ckpt["model"], f"{path}: 'model' of a llama2.c .pt"), _COMPILE_PREFIX)
    if not isinstance(ckpt["model_args"], dict):
        raise CheckpointError(f"{path}: 'model_args' is a {type(ckpt['model_args']).__name__}; {expected}")
    args = {str(k): v for k, v in ckpt["model_args"].items()}
    tied = "output.weight" not in sd or (
        "tok_embeddings.weight" in sd and torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    )
    if args.get("hidden_dim") is None and "layers.0.feed_forward.w1.weight" in sd:
        args["hidden_dim"] = sd["layers.0.feed_forward.w1.weight"].shape[0]
    try:
        cfg = ModelConfig.from_dict({**args, "tie_embeddings": tied})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model_args {args}: {e}") from e
    return model_from_state_dict(cfg, sd, path)


# ---------------------------------------------------------------------------------------------
# .bin files


def _layer_names(cfg: ModelConfig, leaf: str) -> list[str]:
    return [f"layers.{i}.{leaf}" for i in range(cfg.n_layers)]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, h, kv = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,),
                                          "output.weight": (cfg.vocab_size, d)}
    per_layer = {"attention_norm.weight": (d,), "ffn_norm.weight": (d,),
                 "attention.wq.weight": (cfg.n_heads * cfg.head_dim, d), "attention.wk.weight": (kv, d),
                 "attention.wv.weight": (kv, d), "attention.wo.weight": (d, cfg.n_heads * cfg.head_dim),
                 "feed_forward.w1.weight": (h, d), "feed_forward.w2.weight": (d, h),
                 "feed_forward.w3.weight": (h, d)}
    for leaf, shape in per_layer.items():
        for name in _layer_names(cfg, leaf):
            shapes[name] = shape
    return shapes


def _order(cfg: ModelConfig, version: int, shared: bool) -> list[str]:
    """Tensor names in file order (v0 also has the RoPE tables after ``norm.weight``; v2 below)."""
    ln = lambda leaf: _layer_names(cfg, leaf)  # noqa: E731
    mats = [*ln("attention.wq.weight"), *ln("attention.wk.weight"), *ln("attention.wv.weight"),
            *ln("attention.wo.weight")]
    ffn = [*ln("feed_forward.w1.weight"), *ln("feed_forward.w2.weight"), *ln("feed_forward.w3.weight")]
    cls = [] if shared else ["output.weight"]
    if version == 0:
        return ["tok_embeddings.weight", *ln("attention_norm.weight"), *mats, *ln("ffn_norm.weight"), *ffn,
                "norm.weight", *cls]
    # v1 and v2 share the order; v2 keeps the norms in float32 and quantizes the rest
    norms = [*ln("attention_norm.weight"), *ln("ffn_norm.weight"), "norm.weight"]
    return [*norms, "tok_embeddings.weight", *mats, *ffn, *cls]


def q80_group_size(dim: int, group_size: int = 64) -> int:
    """llama2.c's rule: halve the group size until it divides ``dim``."""
    while dim % group_size:
        group_size //= 2
    return group_size


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group (scale = max|w| / 127, round half to even), as llama2.c's export.py."""
    w = w.detach().float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group -> zeros, scale 0
    return torch.round(w / safe[:, None]).to(torch.int8), scale


def _read_header(path: Path, data: bytes) -> tuple[int, tuple[int, ...], bool, int, int]:
    """(version, 7 header ints with |vocab|, shared, group_size, data offset)."""
    if len(data) >= 8 and struct.unpack_from("<I", data, 0)[0] == MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version not in (1, 2):
            raise CheckpointError(f"{path}: llama2.c .bin version {version} is not supported (1 or 2)")
        if len(data) < HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
        hdr = _HEADER7.unpack_from(data, 8)
        shared = bool(data[8 + _HEADER7.size])
        group = struct.unpack_from("<i", data, 8 + _HEADER7.size + 1)[0] if version == 2 else 0
        return version, hdr, shared, group, HEADER_BYTES
    if len(data) < _HEADER7.size:
        raise CheckpointError(f"{path}: truncated: {len(data)} bytes, too short for a llama2.c header")
    hdr = list(_HEADER7.unpack_from(data, 0))
    shared = hdr[5] > 0
    hdr[5] = abs(hdr[5])
    return 0, tuple(hdr), shared, 0, _HEADER7.size


def _config_from_header(path: Path, hdr: tuple[int, ...], shared: bool) -> ModelConfig:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = hdr
    ok = (all(0 < v < 1 << 24 for v in hdr) and dim % n_heads == 0 and n_heads % n_kv == 0
          and (dim // n_heads) % 2 == 0)
    if not ok:
        raise CheckpointError(
            f"{path}: not a llama2.c .bin (wrong magic or implausible header dim={dim} hidden_dim={hidden} "
            f"n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv} vocab_size={vocab} max_seq_len={seq})"
        )
    return ModelConfig(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       vocab_size=vocab, max_seq_len=seq, norm_eps=LLAMA2C_NORM_EPS,
                       rope_theta=LLAMA2C_ROPE_THETA, tie_embeddings=shared)


def read_llama2c_bin(path: str | Path) -> tuple[Llama, dict]:
    """Parse a llama2.c ``.bin`` (v0, v1, v2; v2 dequantized) -> (model, header info)."""
    path = Path(path)
    data = path.read_bytes()
    version, hdr, shared, group, offset = _read_header(path, data)
    cfg = _config_from_header(path, hdr, shared)
    shapes = _shapes(cfg)
    names = _order(cfg, version, shared)
    numel = {n: int(np.prod(shapes[n])) for n in names}
    rope_floats = 2 * cfg.max_seq_len * cfg.head_dim // 2 if version == 0 else 0
    if version == 2:
        if group <= 0 or cfg.dim % group:
            raise CheckpointError(f"{path}: v2 group size {group} does not divide dim={cfg.dim}")
        n_norm = 2 * cfg.n_layers + 1
        quant = names[n_norm:]
        expected = offset + 4 * sum(numel[n] for n in names[:n_norm]) + sum(
            numel[n] + 4 * (numel[n] // group) for n in quant)
    else:
        expected = offset + 4 * (sum(numel.values()) + rope_floats)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: {what}: {len(data)} bytes, but a v{version} file with this header "
            f"({'shared' if shared else 'separate'} classifier) is {expected} bytes"
        )
    sd: dict[str, torch.Tensor] = {}
    pos = offset

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += arr.nbytes
        return arr

    for i, name in enumerate(names):
        if version == 2 and i >= 2 * cfg.n_layers + 1:
            q = torch.from_numpy(take("<i1", numel[name]).astype(np.float32)).view(-1, group)
            s = torch.from_numpy(take("<f4", numel[name] // group).copy())
            sd[name] = (q * s[:, None]).reshape(shapes[name])
        else:
            sd[name] = torch.from_numpy(take("<f4", numel[name]).copy()).reshape(shapes[name])
        if version == 0 and name == "norm.weight":
            pos += 4 * rope_floats  # RoPE tables: we compute our own
    model = model_from_state_dict(cfg, sd, path)
    return model, {"version": version, "shared_classifier": shared, "group_size": group, "header": hdr}


def load_llama2c(path: str | Path) -> Llama:
    """Load a llama2.c checkpoint: the PyTorch ``.pt`` dict or a ``.bin`` (v0, v1, v2)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in (".pt", ".pth"):
        return load_llama2c_pt(path)
    return read_llama2c_bin(path)[0]


def _plain_weights(model: Llama) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise CheckpointError(f"the model still has LoRA weights ({lora[0]} ...); merge them first (merge_lora)")
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def llama2c_bin_bytes(model: Llama, version: int = 0, group_size: int = 64) -> bytes:
    """The bytes :func:`save_llama2c_bin` writes."""
    cfg = model.cfg
    if version not in (0, 1, 2):
        raise ValueError(f"llama2.c .bin version must be 0, 1 or 2, got {version}")
    if cfg.rope_theta != LLAMA2C_ROPE_THETA or cfg.norm_eps != LLAMA2C_NORM_EPS:
        raise ValueError(
            f"llama2.c .bin files assume rope_theta={LLAMA2C_ROPE_THETA:g} and norm_eps={LLAMA2C_NORM_EPS:g}; "
            f"this model has rope_theta={cfg.rope_theta:g}, norm_eps={cfg.norm_eps:g}: export format=hf instead"
        )
    sd = _plain_weights(model)
    shared = torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    hdr = [cfg.dim, sd["layers.0.feed_forward.w1.weight"].shape[0], cfg.n_layers, cfg.n_heads,
           cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len]
    names = _order(cfg, version, shared)
    f32 = lambda t: t.numpy().astype("<f4").tobytes()  # noqa: E731
    parts: list[bytes] = []
    if version == 0:
        hdr[5] = hdr[5] if shared else -hdr[5]
        parts.append(_HEADER7.pack(*hdr))
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, LLAMA2C_ROPE_THETA)
        for name in names:
            parts.append(f32(sd[name]))
            if name == "norm.weight":
                parts += [f32(cos), f32(sin)]
        return b"".join(parts)
    header = struct.pack("<Ii", MAGIC, version) + _HEADER7.pack(*hdr) + struct.pack("<B", int(shared))
    if version == 1:
        parts.append(header.ljust(HEADER_BYTES, b"\0"))
        parts += [f32(sd[n]) for n in names]
        return b"".join(parts)
    group = q80_group_size(cfg.dim, group_size)
    parts.append((header + struct.pack("<i", group)).ljust(HEADER_BYTES, b"\0"))
    n_norm = 2 * cfg.n_layers + 1
    parts += [f32(sd[n]) for n in names[:n_norm]]
    for name in names[n_norm:]:
        if sd[name].numel() % group:
            raise ValueError(f"{name} has {sd[name].numel()} elements, not a multiple of group size {group}")
        q, s = quantize_q80(sd[name], group)
        parts += [q.numpy().astype("<i1").tobytes(), f32(s)]
    return b"".join(parts)


def save_llama2c_bin(model: Llama, path: str | Path, version: int = 0, group_size: int = 64) -> Path:
    """Write ``model`` as llama2.c ``.bin``: 0 = legacy (``run.c``), 1 = float32 + header, 2 = Q8_0 (``runq.c``)."""
    path = Path(path)
    data = llama2c_bin_bytes(model, version, group_size)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
