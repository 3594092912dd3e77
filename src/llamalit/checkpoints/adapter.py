"""llamalit's LoRA adapter directory: PEFT files plus ``llamalit_adapter.json`` naming its base.

Written by :func:`save_adapter` (earlier versions: ``adapter.safetensors`` +
``adapter_config.json``). Loading reads the base it names (relative to the adapter directory),
refuses a base whose files changed since (:mod:`llamalit.checkpoints.fingerprint`), and applies
the adapter to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llamalit.checkpoints.common import (
    BaseLoader,
    CheckpointError,
    fetch,
    format_tag,
    model_from_state_dict,
    resolve_relative,
)
from llamalit.checkpoints.fingerprint import check_base
from llamalit.checkpoints.peft import PEFT_FILES, PEFT_WEIGHTS, from_peft_tensors, write_peft_files
from llamalit.model.build import build_model
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, load_lora_state_dict, lora_layers, merge_lora
from llamalit.utils.fileio import atomic_checkpoint_dir, atomic_write_json, read_tagged_json

__all__ = ["is_adapter_dir", "load_adapter", "load_adapter_dir", "save_adapter"]

ADAPTER_FORMAT = "llamalit-lora/2"
ADAPTER_META = "llamalit_adapter.json"
# earlier versions: our tensor names in adapter.safetensors, our schema in adapter_config.json
LEGACY_ADAPTER_FORMAT = "llamalit-lora/1"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def load_adapter_dir(path: Path, merge: bool, load_base: BaseLoader) -> Llama:
    """The base the adapter names (read by ``load_base``) with the adapter applied; merged unless ``merge=False``."""
    lora_cfg, sd, meta = load_adapter(path)
    base_ref = meta.get("base")
    if not base_ref:
        raise CheckpointError(f"{path}: its adapter config records no 'base'; load the base model and "
                              "apply the adapter yourself (llamalit.checkpoints.adapter.load_adapter)")
    base_local = fetch(resolve_relative(str(base_ref), path))
    check_base(path, meta, str(base_ref), base_local)
    base = load_base(str(base_local))
    if isinstance(meta.get("model"), dict):  # the shape trained with (e.g. a longer context)
        want = ModelConfig.from_dict(meta["model"])
        if want != base.cfg:
            base = model_from_state_dict(want, base.state_dict(), f"{base_ref} (base of {path})")
    model = build_model(None, lora_cfg, init_from=base)
    try:
        load_lora_state_dict(model, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return merge_lora(model) if merge else model


def _check_matches(model: nn.Module, cfg: LoraConfig) -> None:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to save; call apply_lora(model, cfg) first")
    found = sorted({name.rpartition(".")[2] for name in layers})
    if found != sorted(cfg.targets):
        raise ValueError(f"model has adapters on {found} but the LoraConfig being saved targets "
                         f"{list(cfg.targets)}; save the config the model was built with")
    for name, layer in layers.items():
        if (layer.rank, layer.alpha, layer.lora_dropout.p) != (cfg.rank, cfg.alpha, cfg.dropout):
            raise ValueError(f"{name}: rank={layer.rank} alpha={layer.alpha} dropout={layer.lora_dropout.p} "
                             f"do not match the LoraConfig being saved ({cfg}); "
                             "save the config the model was built with")


def save_adapter(model: nn.Module, out_dir: str | Path, base: str | None, lora_cfg: LoraConfig,
                 extra: dict | None = None) -> Path:
    """Write the adapter as PEFT files (``adapter_model.safetensors``, ``adapter_config.json``) plus
    ``llamalit_adapter.json`` (the base, ``lora_cfg``, the model shape and ``extra``) into ``out_dir``.

    All appear together (:func:`llamalit.utils.fileio.atomic_checkpoint_dir`): a directory holding only an
    earlier adapter is replaced whole; in a shared one (a run directory) PEFT's config goes in last.
    """
    _check_matches(model, lora_cfg)
    out_dir = Path(out_dir)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("adapters are merged in place; unmerge_() them before saving the adapter")
    meta = {"format": ADAPTER_FORMAT, "base": base, "lora": lora_cfg.to_dict()}
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is not None:
        meta["model"] = model_cfg.to_dict()
    meta.update(extra or {})
    owned = (*PEFT_FILES, ADAPTER_META, ADAPTER_WEIGHTS)
    # adapter_config.json goes in last: until it is there the directory loads neither as ours nor as PEFT's
    with atomic_checkpoint_dir(out_dir, owned=owned, commit=ADAPTER_CONFIG) as tmp:
        write_peft_files(model, tmp, base)
        atomic_write_json(tmp / ADAPTER_META, meta)
    return out_dir


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` holds a complete adapter written by :func:`save_adapter` (or an earlier version)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / ADAPTER_META).is_file():
        return (format_tag(path / ADAPTER_META) == ADAPTER_FORMAT and (path / PEFT_WEIGHTS).is_file()
                and (path / ADAPTER_CONFIG).is_file())
    return (path / ADAPTER_WEIGHTS).is_file() and format_tag(path / ADAPTER_CONFIG) == LEGACY_ADAPTER_FORMAT


def load_adapter(path: str | Path, map_location: str = "cpu") -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """Read an adapter directory: its LoraConfig, the adapter tensors (our names) and our config JSON."""
    path = Path(path)
    legacy = not (path / ADAPTER_META).is_file() and format_tag(path / ADAPTER_CONFIG) == LEGACY_ADAPTER_FORMAT
    cfg_path = path / (ADAPTER_CONFIG if legacy else ADAPTER_META)
    meta = read_tagged_json(cfg_path, LEGACY_ADAPTER_FORMAT if legacy else ADAPTER_FORMAT, "lora",
                            "llamalit adapter")
    try:
        lora_cfg = LoraConfig.from_dict(meta["lora"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: bad 'lora' section {meta['lora']!r}: {e}") from e
    weights = path / (ADAPTER_WEIGHTS if legacy else PEFT_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the adapter config is there but not its tensors)")
    sd = load_file(str(weights), device=map_location)
    if not legacy:
        if not isinstance(meta.get("model"), dict):
            raise ValueError(f"{cfg_path}: no 'model' section (the shape the adapter was trained with)")
        sd = from_peft_tensors(sd, ModelConfig.from_dict(meta["model"]), weights)
    return lora_cfg, sd, meta
