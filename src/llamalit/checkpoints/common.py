"""What every checkpoint format shares: the error type, safe pickle loading, shape-checked state dicts,
safetensors writing, and turning a path named in a checkpoint into a local file.

Format modules import from here (never from each other, nor from the loader that detects them).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamalit.model.llama import Llama, ModelConfig
from llamalit.utils.fileio import atomic_path

# How a format that needs its base model (an adapter, a LoRA .ckpt without base weights) gets it: a path,
# URL or Hub id -> the loaded model. The loader passes its own load_checkpoint.
BaseLoader = Callable[[str], Llama]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file and the problem."""


def safe_torch_load(path: str | Path) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: not a plain-weights pickle; torch.load(weights_only=True) refused it "
            f"({why}). llamalit never executes pickled code: if you trust the "
            "file, re-save only its tensors and plain values (e.g. torch.save(ckpt['model'], ...))"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({e})") from e


def describe_keys(obj: object, limit: int = 8) -> str:
    """What a loaded pickle holds, for error messages: up to ``limit`` keys (reprs) of a dict (any key
    types), else its type."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = sorted(repr(k) for k in obj)
    return f"[{', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''}]"


def check_state_dict(sd: object, where: str) -> dict[str, torch.Tensor]:
    """``sd`` itself when it is a dict of str -> tensor; else a CheckpointError naming ``where`` and the first
    bad entry."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where}: expected a state dict (names -> tensors), got a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: expected a state dict (names -> tensors), but entry {k!r} is a "
                                  f"{type(v).__name__}")
    return sd


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys with ``prefix`` removed where they start with it (others unchanged)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str | Path,
                          model: Llama | None = None) -> Llama:
    """A Llama of ``cfg`` holding ``sd``; missing/unexpected keys and shape mismatches name ``source``.

    ``output.weight`` may be absent when the embeddings are tied. ``model`` (e.g. one with LoRA
    applied) is filled instead of a fresh one when given.
    """
    model = model if model is not None else Llama(cfg)
    sd = dict(sd)
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model config (missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''})"
        )
    for name, ref in expected.items():  # in model order, so the first bad tensor is reported
        t = sd[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {name}: file has {tuple(t.shape)}, the config "
                f"(dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, "
                f"hidden_dim={cfg.hidden_dim}, vocab_size={cfg.vocab_size}) needs {tuple(ref.shape)}"
            )
    model.load_state_dict(sd, strict=True)
    return model


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tied/shared tensors are cloned so it stays loadable."""
    seen: dict[int, str] = {}
    plain = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = t.untyped_storage().data_ptr()
        plain[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.setdefault(key, name)
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def resolve_relative(ref: str, base_dir: Path) -> str:
    """A path named inside a checkpoint's JSON: URLs and absolute paths as is, others relative to it."""
    from llamalit.data.download import is_url

    if is_url(ref) or Path(ref).expanduser().is_absolute():
        return str(Path(ref).expanduser()) if not is_url(ref) else ref
    candidate = base_dir / ref
    return str(candidate if candidate.exists() else Path(ref))


def fetch(path_or_url: str | Path) -> Path:
    """A local path for ``path_or_url``: URLs are downloaded into the cache (once); a Hugging Face Hub id
    (``org/name[@revision]``, see :mod:`llamalit.utils.hub`) comes from the Hub cache; a local path wins."""
    from llamalit.data.download import cached_download, default_cache_dir, is_url
    from llamalit.utils.hub import hub_checkpoint, parse_hub_id, require_checkpoint

    require_checkpoint(path_or_url)
    if is_url(str(path_or_url)):
        return cached_download(str(path_or_url), default_cache_dir())
    path = Path(path_or_url).expanduser()
    if not path.exists():
        return hub_checkpoint(parse_hub_id(str(path_or_url)), "checkpoint")
    return path


def format_tag(path: Path) -> str | None:
    """The ``format`` field of the JSON file ``path`` (our metadata files' tag), or None when it has none."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None
