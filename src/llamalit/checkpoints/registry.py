"""Every checkpoint format, in detection order: how each is recognised, read and (where we write it) written.

Directories first, the most specific first (ours is also a Hugging Face directory, our adapter also a
PEFT one), then single files. :func:`llamalit.checkpoints.load_checkpoint` walks :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamalit.checkpoints import adapter, hf, llama2c, native, peft
from llamalit.checkpoints.common import BaseLoader, CheckpointError, describe_keys, safe_torch_load
from llamalit.checkpoints.lightning_ckpt import is_lightning_ckpt, model_from_lightning
from llamalit.model.llama import Llama

_PICKLE_HEADS = (b"PK\x03\x04", b"\x80")  # torch zip archive, legacy pickle protocol 2+


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    ``detect(path)``: whether ``path`` holds it. ``load(path, merge, load_base)``: the model (adapters
    merged unless ``merge`` is false; ``load_base`` reads the base an adapter names). ``save``: our
    writer, if we write it. ``weights``: for a directory format, the glob of its weights file (a
    ``.safetensors`` path given for the directory must match it).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, bool, BaseLoader], Llama]
    save: Callable[..., Path] | None = None
    weights: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.weights is not None


def _head(path: Path) -> bytes:
    if not path.is_file():
        return b""
    with open(path, "rb") as f:
        return f.read(8)


def _is_torch_pickle(path: Path) -> bool:
    return _head(path).startswith(_PICKLE_HEADS)


def _is_llama2c_bin(path: Path) -> bool:
    """The magic of v1/v2, or a ``.bin`` name (v0 has no magic: its header and size are checked while reading)."""
    head = _head(path)
    return path.is_file() and ((len(head) >= 4 and int.from_bytes(head[:4], "little") == llama2c.MAGIC)
                               or path.suffix == ".bin")


def _load_torch(path: Path, merge: bool, load_base: BaseLoader) -> Llama:
    """A torch pickle: a Lightning ``.ckpt`` of our module or a llama2.c ``.pt``."""
    obj = safe_torch_load(path)
    if is_lightning_ckpt(obj):
        return model_from_lightning(obj, path, merge, load_base)
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        return llama2c.load_llama2c_pt(path)
    raise CheckpointError(
        f"{path}: a torch pickle that is neither a Lightning .ckpt (a dict with 'state_dict' and "
        "'hyper_parameters') nor a llama2.c .pt (a dict with 'model', a state dict of tensors, and "
        f"'model_args'); found {describe_keys(obj)}"
    )


FORMATS: tuple[Format, ...] = (
    Format("native", native.is_native_dir, lambda p, merge, load_base: native.load_model(p),
           save=native.save_model, weights=native.WEIGHTS),
    Format("adapter", adapter.is_adapter_dir, adapter.load_adapter_dir, save=adapter.save_adapter,
           weights="adapter*.safetensors"),
    Format("peft", peft.is_peft_dir, lambda p, merge, load_base: peft.load_peft(p, merge=merge, load_base=load_base),
           save=peft.save_peft, weights=peft.PEFT_WEIGHTS),
    Format("hf", hf.is_hf_dir, lambda p, merge, load_base: hf.load_hf(p), save=hf.save_hf,
           weights="model*.safetensors"),
    Format("torch", _is_torch_pickle, _load_torch),
    Format("llama2c_bin", _is_llama2c_bin, lambda p, merge, load_base: llama2c.read_llama2c_bin(p)[0],
           save=llama2c.save_llama2c_bin),
)
BY_NAME = {f.name: f for f in FORMATS}


def format_of(path: Path) -> Format | None:
    """The first format (in :data:`FORMATS` order) that ``path`` holds, or None."""
    return next((f for f in FORMATS if f.is_dir == path.is_dir() and f.detect(path)), None)
