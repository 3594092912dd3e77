"""llamalit's LoRA adapter directory: PEFT files plus ``llamalit_adapter.json`` naming its base.

Written by :func:`llamalit.lora.save_adapter` (earlier versions: ``adapter.safetensors`` +
``adapter_config.json``). Loading reads the base it names (relative to the adapter directory),
refuses a base whose files changed since (:mod:`llamalit.checkpoints.fingerprint`), and applies
the adapter to it.
"""

from __future__ import annotations

from pathlib import Path

from llamalit.build import build_model
from llamalit.checkpoints.common import (
    BaseLoader,
    CheckpointError,
    fetch,
    model_from_state_dict,
    resolve_relative,
)
from llamalit.checkpoints.fingerprint import check_base
from llamalit.lora import is_adapter_dir, load_adapter, load_lora_state_dict, merge_lora, save_adapter
from llamalit.model import Llama, ModelConfig

__all__ = ["is_adapter_dir", "load_adapter_dir", "save_adapter"]


def load_adapter_dir(path: Path, merge: bool, load_base: BaseLoader) -> Llama:
    """The base the adapter names (read by ``load_base``) with the adapter applied; merged unless ``merge=False``."""
    lora_cfg, sd, meta = load_adapter(path)
    base_ref = meta.get("base")
    if not base_ref:
        raise CheckpointError(f"{path}: its adapter config records no 'base'; load the base model and "
                              "apply the adapter yourself (llamalit.lora.load_adapter)")
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
