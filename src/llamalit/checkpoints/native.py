"""llamalit's own weights format: a directory with ``model.safetensors`` and ``config.json``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llamalit.fileio import atomic_checkpoint_dir, atomic_path, atomic_write_json, read_tagged_json
from llamalit.model import Llama, ModelConfig

FORMAT = "llamalit/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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


def save_model(model: Llama, out_dir: str | Path, extra: dict | None = None,
               files: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``model.safetensors`` (without the tied output copy) and ``config.json`` into ``out_dir``.

    ``files``: more files to publish with them, name -> source (e.g. ``{"tokenizer.model": tok}``).
    All appear together (:func:`llamalit.fileio.atomic_checkpoint_dir`): a directory holding only
    an earlier export is replaced whole; other files in ``out_dir`` (a run directory) are kept.
    """
    out_dir = Path(out_dir)
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    files = dict(files or {})
    bad = [n for n in files if Path(n).name != n or n in (WEIGHTS, CONFIG, "", ".", "..")]
    if bad:
        raise ValueError(f"save_model: files names {bad} must be plain file names other than {WEIGHTS}/{CONFIG}")
    with atomic_checkpoint_dir(out_dir, owned=(WEIGHTS, CONFIG, *files), commit=CONFIG) as tmp:
        save_tensors(sd, tmp / WEIGHTS, metadata={"format": FORMAT})
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        atomic_write_json(tmp / CONFIG, {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})})
    return out_dir


def is_native_dir(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG
    if not (cfg.is_file() and (Path(path) / WEIGHTS).is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a native directory, with a clear error when it is not one."""
    return read_tagged_json(Path(path) / CONFIG, FORMAT, "model", "llamalit model")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Llama:
    """Load a model written by :func:`save_model`."""
    meta = read_config(path)
    model = Llama(ModelConfig.from_dict(meta["model"]))
    sd = load_file(str(Path(path) / WEIGHTS), device=str(map_location))
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
        sd["output.weight"] = sd["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{Path(path) / WEIGHTS}: weights do not match config.json "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model
