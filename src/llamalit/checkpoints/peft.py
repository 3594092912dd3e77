"""PEFT LoRA adapters: export our LoRA model so ``peft.PeftModel.from_pretrained`` loads it on top of
our Hugging Face export (:func:`llamalit.checkpoints.hf.save_hf` of the base), and import back.

PEFT computes ``W x + (alpha / r) * B A x`` like we do; only names and the RoPE layout differ.
HF's q_proj/k_proj rows are a per-head permutation P of ours, so ``P (W + s B A) = P W + s (P B) A``:
lora_B of wq/wk gets the same row permutation as the base weight, lora_A stays.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llamalit.checkpoints.common import BaseLoader, CheckpointError, resolve_relative, save_tensors
from llamalit.checkpoints.hf_layout import hf_name, permute_from_hf, permute_to_hf
from llamalit.model.build import build_model
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, load_lora_state_dict, lora_layers, merge_lora
from llamalit.utils.fileio import atomic_checkpoint_dir, atomic_write_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, "adapter_model.bin")
_PREFIX = "base_model.model."
_TO_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
          "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}
_FROM_HF = {v: k for k, v in _TO_HF.items()}


def _hf_module(name: str) -> str:
    """``layers.0.attention.wq`` -> ``model.layers.0.self_attn.q_proj``."""
    return hf_name(f"{name}.weight").removesuffix(".weight")


def _row_heads(model: Llama, name: str) -> int | None:
    """Heads whose rows are permuted for this module (wq: n_heads, wk: n_kv_heads), else None."""
    leaf = name.rpartition(".")[2]
    return {"wq": model.cfg.n_heads, "wk": model.cfg.n_kv_heads}.get(leaf)


def is_peft_dir(path: str | Path) -> bool:
    path = Path(path)
    if not ((path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file()):
        return False
    try:
        return json.loads((path / PEFT_CONFIG).read_text()).get("peft_type") == "LORA"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def save_peft(model: Llama, out_dir: str | Path, base: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for a model with LoRA applied.

    ``base`` is recorded as ``base_model_name_or_path`` (the Hugging Face export of the base model).
    Both files appear together (:func:`llamalit.utils.fileio.atomic_checkpoint_dir`); other files in
    ``out_dir`` (e.g. the base export in ``out_dir/base``) are kept.
    """
    out_dir = Path(out_dir)
    with atomic_checkpoint_dir(out_dir, owned=PEFT_FILES, commit=PEFT_CONFIG) as tmp:
        write_peft_files(model, tmp, base)
    return out_dir


def write_peft_files(model: Llama, folder: Path, base: str | None = None) -> None:
    """The files of :func:`save_peft`, written straight into ``folder`` (the caller publishes it atomically)."""
    layers = lora_layers(model)
    if not layers:
        raise CheckpointError("save_peft: the model has no LoRA adapters (load it with merge=False)")
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for m in layers.values()}
    if len(settings) != 1:
        raise CheckpointError(f"save_peft: adapters differ in (rank, alpha, dropout) {sorted(settings)}; "
                              "PEFT's config holds one setting")
    if any(m.merged for m in layers.values()):
        raise CheckpointError("save_peft: adapters are merged in place; unmerge_() them first")
    rank, alpha, dropout = settings.pop()
    tensors: dict[str, torch.Tensor] = {}  # in the adapters' own dtype (a QLoRA run's are bf16)
    for name, m in layers.items():
        key = _PREFIX + _hf_module(name)
        b = m.lora_B.detach()
        heads = _row_heads(model, name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"{key}.lora_B.weight"] = permute_to_hf(b, heads) if heads else b
    targets = sorted({_TO_HF[name.rpartition(".")[2]] for name in layers})
    save_tensors(tensors, folder / PEFT_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    })


def from_peft_tensors(theirs: dict[str, torch.Tensor], cfg: ModelConfig, source: str | Path
                      ) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors (HF names and RoPE layout) as our LoRA state dict (``layers.0.attention.wq.lora_A``)."""
    modules = [f"layers.{i}.{m}" for i in range(cfg.n_layers)
               for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")] + ["output"]
    ours_by_key = {_PREFIX + _hf_module(m): m for m in modules}
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    sd: dict[str, torch.Tensor] = {}
    for key, t in theirs.items():
        module, _, part = key.removesuffix(".weight").rpartition(".")
        name = ours_by_key.get(module)
        if name is None or part not in ("lora_A", "lora_B"):
            raise CheckpointError(f"{source}: {key} is not a LoRA tensor of a Llama linear layer")
        n = heads.get(name.rpartition(".")[2])
        sd[f"{name}.{part}"] = permute_from_hf(t, n) if part == "lora_B" and n else t
    return sd


def _read_peft_config(path: Path) -> dict:
    cfg_path = path / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable PEFT adapter config ({e})") from e
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            problems.append(f"{key}=true")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key} set")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save") or cfg.get("layers_to_transform"):
        problems.append("bias/modules_to_save/layers_to_transform")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or any(t not in _FROM_HF for t in targets):
        problems.append(f"target_modules={targets!r} (a list among {sorted(_FROM_HF)})")
    if problems:
        raise CheckpointError(f"{cfg_path}: unsupported PEFT adapter: {', '.join(problems)}")
    return cfg


def load_peft(path: str | Path, base: Llama | None = None, merge: bool = True,
              load_base: BaseLoader | None = None) -> Llama:
    """Our Llama with a PEFT LoRA adapter applied (merged unless ``merge=False``).

    ``base`` defaults to ``load_base(base_model_name_or_path)`` (relative to the adapter dir);
    ``llamalit.checkpoints.load_peft`` passes ``load_checkpoint`` as ``load_base``.
    """
    path = Path(path)
    cfg = _read_peft_config(path)
    if base is None:
        ref = cfg.get("base_model_name_or_path")
        if not ref:
            raise CheckpointError(f"{path / PEFT_CONFIG}: no base_model_name_or_path; pass the base model")
        if load_base is None:
            raise CheckpointError(f"{path}: pass the base model, or a load_base to read {ref}")
        base = load_base(resolve_relative(ref, path))
    lora_cfg = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                          dropout=float(cfg.get("lora_dropout") or 0.0),
                          targets=tuple(_FROM_HF[t] for t in cfg["target_modules"]))
    model = build_model(None, lora_cfg, init_from=base)
    theirs = load_file(str(path / PEFT_WEIGHTS))
    sd: dict[str, torch.Tensor] = {}
    for name in lora_layers(model):
        key = _PREFIX + _hf_module(name)
        for part in ("lora_A", "lora_B"):
            full = f"{key}.{part}.weight"
            if full not in theirs:
                raise CheckpointError(f"{path / PEFT_WEIGHTS}: missing {full}")
            t = theirs.pop(full).float()
            heads = _row_heads(model, name)
            sd[f"{name}.{part}"] = permute_from_hf(t, heads) if part == "lora_B" and heads else t
    if theirs:
        raise CheckpointError(f"{path / PEFT_WEIGHTS}: tensors not matching the targets: {sorted(theirs)[:5]}")
    try:
        load_lora_state_dict(model, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return merge_lora(model) if merge else model
