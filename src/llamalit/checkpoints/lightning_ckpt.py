"""Lightning ``.ckpt`` files written while training a ``LlamaLitModule``.

``state_dict`` holds ``model.<our parameter name>`` (LoRA wrappers keep the base names and add
``...lora_A`` / ``...lora_B``); ``hyper_parameters`` holds the module's arguments: the model shape as
built (``model_cfg``), the adapter settings (``lora_cfg``, None without LoRA) and the base (``init_from``).
Checkpoints of earlier versions hold the whole run config there instead, as ``hyper_parameters["cfg"]``
(``model``, ``lora`` with ``enabled``, ``init_from``); both are read. A LoRA run on an ``init_from``
base saves only the trainable tensors (marked by ``base_fingerprint``); the base is loaded from
``init_from`` again. Read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamalit.checkpoints.common import (
    BaseLoader,
    CheckpointError,
    check_state_dict,
    model_from_state_dict,
    safe_torch_load,
    strip_prefix,
)
from llamalit.model.build import build_model
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import merge_lora


def is_lightning_ckpt(obj: object) -> bool:
    """A loaded dict that looks like a Lightning checkpoint of our module."""
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def model_from_lightning(ckpt: dict, source: str | Path, merge: bool, load_base: BaseLoader) -> Llama:
    """The Llama of a loaded Lightning checkpoint; LoRA adapters merged unless ``merge=False``.

    ``load_base`` reads the ``init_from`` base of a LoRA checkpoint that holds only the adapters.
    """
    check_state_dict(ckpt["state_dict"], f"{source}: 'state_dict'")
    cfg = run_settings(ckpt.get("hyper_parameters"))
    if cfg is None:
        raise CheckpointError(f"{source}: hyper_parameters has neither a model_cfg dict nor a cfg['model'] dict; "
                              "not a llamalit training checkpoint")
    sd: dict[str, torch.Tensor] = ckpt["state_dict"]
    sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    sd = strip_prefix(sd, "_orig_mod.")
    if not sd:
        raise CheckpointError(f"{source}: state_dict has no 'model.*' keys")
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad model settings {cfg['model']}: {e}") from e
    lora = cfg["lora"]
    has_adapter = any(k.endswith((".lora_A", ".lora_B")) for k in sd)
    if not has_adapter:
        return model_from_state_dict(model_cfg, sd, source)
    if not lora:
        raise CheckpointError(f"{source}: state_dict has LoRA tensors but hyper_parameters name no LoRA settings")
    model = build_model(model_cfg, lora)
    if "base_fingerprint" in ckpt:  # adapters only (a LoRA run on init_from): the frozen base comes from there
        sd = {**base_weights(cfg["init_from"], source, load_base), **sd}
    model_from_state_dict(model_cfg, sd, source, model=model)
    return merge_lora(model) if merge else model


def run_settings(hyper_parameters: object) -> dict | None:
    """``{"model": shape dict, "lora": adapter settings or None, "init_from": base or None}`` from a checkpoint's
    ``hyper_parameters``, as ``LlamaLitModule`` saves them or as earlier versions did (``cfg``: the run config,
    adapters on when ``lora.enabled``); None when they hold neither."""
    if not isinstance(hyper_parameters, dict):
        return None
    if isinstance(hyper_parameters.get("model_cfg"), dict):
        return {"model": hyper_parameters["model_cfg"], "lora": hyper_parameters.get("lora_cfg") or None,
                "init_from": hyper_parameters.get("init_from")}
    cfg = hyper_parameters.get("cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        return None
    lora = cfg.get("lora") or {}
    return {"model": cfg["model"], "lora": lora if lora.get("enabled") else None, "init_from": cfg.get("init_from")}


def base_weights(init_from: str | None, source: str | Path, load_base: BaseLoader) -> dict[str, torch.Tensor]:
    """The state dict of the base model a LoRA checkpoint without base weights was trained on."""
    if not init_from:
        raise CheckpointError(f"{source}: holds LoRA adapters without base weights but names no init_from")
    try:
        base = load_base(init_from)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: its base model init_from={init_from} cannot be loaded ({e})") from e
    return base.state_dict()


def load_lightning_ckpt(path: str | Path, merge: bool, load_base: BaseLoader) -> Llama:
    """Load the model of a Lightning ``.ckpt`` (see :func:`model_from_lightning`)."""
    ckpt = safe_torch_load(path)
    if not is_lightning_ckpt(ckpt):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' + 'hyper_parameters')")
    return model_from_lightning(ckpt, path, merge, load_base)
