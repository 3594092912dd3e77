"""``load_checkpoint(path_or_url)``: detect which supported format a path holds and load it.

Directories: ours (a Hugging Face Llama directory + ``llamalit.json``; earlier versions:
``model.safetensors`` + ``config.json`` with ``format: llamalit/1``), a llamalit LoRA adapter (PEFT
files + ``llamalit_adapter.json`` naming its base; earlier versions: ``adapter.safetensors`` +
``adapter_config.json``), a PEFT adapter (``adapter_model.safetensors``), a Hugging Face Llama
(``config.json`` + weights).
Files: a torch pickle (Lightning ``.ckpt`` or llama2.c ``.pt``, read with ``weights_only=True``),
a llama2.c ``.bin`` (v1/v2 by magic, v0 by a plausible header and exact size), or a
``.safetensors`` file inside one of the directories above. URLs are downloaded into the cache
first. Adapters are merged into the base on load unless ``merge=False``, which returns the
model with LoRA layers applied (for further training or PEFT export).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from llamalit.checkpoints import peft
from llamalit.checkpoints.common import CheckpointError, fetch, resolve_relative
from llamalit.checkpoints.native import META
from llamalit.checkpoints.registry import BY_NAME, format_of
from llamalit.checkpoints.tokenizer import find_tokenizer
from llamalit.model.llama import Llama

__all__ = ["detect_format", "fetch", "find_tokenizer", "load_checkpoint", "load_peft", "resolve_relative"]

# JSON files that stand for the checkpoint directory they are in
_CONFIG_NAMES = ("config.json", "adapter_config.json", META, "llamalit_adapter.json")
_ACCEPTED = ("accepted: a llamalit, adapter, PEFT or Hugging Face checkpoint directory (or a file in one), "
             "a Lightning .ckpt, a llama2.c .pt or .bin")


def detect_format(path: Path) -> str:
    """The name of the format ``path`` holds (see :data:`llamalit.checkpoints.registry.FORMATS`), or an error."""
    if path.is_dir():
        fmt = format_of(path)
        if fmt is not None:
            return fmt.name
        listing = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path}: unknown checkpoint directory (found {listing}); expected model.safetensors + "
            "config.json (Hugging Face, with llamalit.json: llamalit), adapter_model.safetensors + "
            "adapter_config.json (PEFT, with llamalit_adapter.json: llamalit)"
        )
    if path.suffix == ".safetensors" or path.name in _CONFIG_NAMES:
        try:
            name = detect_format(path.parent)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {_lone_file_problem(path)}; {_ACCEPTED}") from e
        weights = BY_NAME[name].weights
        if path.suffix == ".safetensors" and not fnmatch.fnmatchcase(path.name, weights):
            raise CheckpointError(f"{path}: not the weights of the {name} checkpoint directory {path.parent} "
                                  f"(that is {weights}); pass the directory, or move the file out")
        return name
    fmt = format_of(path)
    if fmt is None:
        with open(path, "rb") as f:
            head = f.read(8)
        raise CheckpointError(f"{path}: unknown checkpoint format (first bytes {head!r}); {_ACCEPTED}")
    return fmt.name


def _lone_file_problem(path: Path) -> str:
    """Why a ``.safetensors`` / config file is no checkpoint when its folder is not a checkpoint directory."""
    if path.suffix != ".safetensors":
        return f"its folder {path.parent} is not a checkpoint directory (weights missing beside it?)"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            st.keys()
    except Exception as e:  # safetensors raises its own error types
        return f"not a readable safetensors file (truncated or corrupt? {e})"
    return (f"a safetensors file alone is not a checkpoint, and its folder {path.parent} lacks the config "
            "that goes with it")


def load_checkpoint(path_or_url: str | Path, merge: bool = True) -> Llama:
    """Load any supported checkpoint (see the module docstring): a float32 Llama on the CPU, in eval mode.

    ``merge``: fold LoRA adapters into the weights (default) or keep them as LoRA layers.
    """
    return _load(fetch(path_or_url), merge).eval()


def _load(path: Path, merge: bool) -> Llama:
    fmt = BY_NAME[detect_format(path)]
    if fmt.is_dir and path.is_file():  # a file inside the directory stands for it
        path = path.parent
    return fmt.load(path, merge, load_checkpoint)


def load_peft(path: str | Path, base: Llama | None = None, merge: bool = True) -> Llama:
    """Our Llama with a PEFT LoRA adapter applied (merged unless ``merge=False``).

    ``base`` defaults to ``load_checkpoint(base_model_name_or_path)`` (relative to the adapter dir).
    """
    return peft.load_peft(path, base=base, merge=merge, load_base=load_checkpoint)
