"""llamalit's own weights format: a Hugging Face Llama directory plus ``llamalit.json``.

``model.safetensors`` + ``config.json`` (+ ``generation_config.json``, ``tokenizer.model``) are what
:func:`llamalit.checkpoints.hf.save_hf` writes, so ``transformers.AutoModelForCausalLM.from_pretrained``
loads the directory as is; our own metadata (the exact ``ModelConfig``, the tokenizer, the experiment)
is ``llamalit.json``. Earlier versions wrote ``model.safetensors`` in our tensor names with a
``config.json`` of our own (``format: llamalit/1``): those directories still load.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from llamalit.checkpoints.common import CheckpointError, format_tag, model_from_state_dict
from llamalit.checkpoints.hf import HF_FILES, load_hf, write_hf_files
from llamalit.model.llama import Llama, ModelConfig
from llamalit.utils.fileio import atomic_checkpoint_dir, atomic_write_json, read_tagged_json

FORMAT = "llamalit/2"
META = "llamalit.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LEGACY_FORMAT = "llamalit/1"  # config.json of earlier versions, with model.safetensors in our names
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens")


def save_model(model: Llama, out_dir: str | Path, extra: dict | None = None,
               files: Mapping[str, str | Path] | None = None) -> Path:
    """Write the model as a Hugging Face directory (``model.safetensors``, ``config.json``, ...) plus
    ``llamalit.json`` (its ``ModelConfig`` and ``extra``) into ``out_dir``.

    ``files``: more files to publish with them, name -> source (e.g. ``{"tokenizer.model": tok}``;
    that one also gets the Hugging Face ``tokenizer_config.json``). All appear together
    (:func:`llamalit.utils.fileio.atomic_checkpoint_dir`): a directory holding only an earlier export is
    replaced whole; other files in ``out_dir`` (a run directory) are kept.
    """
    out_dir = Path(out_dir)
    files = dict(files or {})
    bad = [n for n in files if Path(n).name != n or n in (WEIGHTS, CONFIG, META, "", ".", "..")]
    if bad:
        raise ValueError(f"save_model: files names {bad} must be plain file names other than "
                         f"{WEIGHTS}/{CONFIG}/{META}")
    tokenizer = files.pop("tokenizer.model", None)
    dtype = next(iter(model.parameters())).dtype
    # config.json goes in last: until it is there the directory loads neither as ours nor as Hugging Face's
    # the tokenizer files are ours to replace only when a tokenizer comes with the model
    owned = [n for n in HF_FILES if tokenizer or not n.startswith(_TOKENIZER_FILES)] + [META, *files]
    with atomic_checkpoint_dir(out_dir, owned=owned, commit=CONFIG) as tmp:
        write_hf_files(model, tmp, tokenizer=tokenizer, dtype=dtype if dtype.is_floating_point else None)
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        atomic_write_json(tmp / META, {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})})
    return out_dir


def is_native_dir(path: str | Path) -> bool:
    """A directory :func:`save_model` wrote (or an earlier version's ``llamalit/1`` directory)."""
    path = Path(path)
    if (path / META).is_file():
        return format_tag(path / META) == FORMAT and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()
    return (path / WEIGHTS).is_file() and format_tag(path / CONFIG) == LEGACY_FORMAT


def is_legacy_dir(path: str | Path) -> bool:
    """An earlier version's directory: our tensor names in ``model.safetensors``, our ``config.json``."""
    return not (Path(path) / META).is_file() and format_tag(Path(path) / CONFIG) == LEGACY_FORMAT


def read_config(path: str | Path) -> dict:
    """Our metadata of a native directory (``llamalit.json``, or an earlier version's ``config.json``),
    with a clear error when it is not one."""
    path = Path(path)
    if is_legacy_dir(path):
        return read_tagged_json(path / CONFIG, LEGACY_FORMAT, "model", "llamalit model")
    return read_tagged_json(path / META, FORMAT, "model", "llamalit model")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Llama:
    """Load a model written by :func:`save_model` (or by an earlier version), shape-checked."""
    path = Path(path)
    meta = read_config(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / (CONFIG if is_legacy_dir(path) else META)}: {e}") from e
    if not is_legacy_dir(path):
        model = load_hf(path, device=map_location)
        if model.cfg != cfg:  # what HF's config.json cannot say (dropout, multiple_of)
            model = model_from_state_dict(cfg, model.state_dict(), path / META).to(map_location)
        return model
    try:
        sd = load_file(str(path / WEIGHTS), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({e})") from e
    return model_from_state_dict(cfg, sd, path / WEIGHTS)

