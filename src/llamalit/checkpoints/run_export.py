"""What a training run leaves behind, loadable without Lightning: the trained model as our directory (a
Hugging Face Llama plus ``llamalit.json``) or, for a LoRA run, the adapter alone (PEFT files plus
``llamalit_adapter.json``); and publishing those files to a shared place."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llamalit.checkpoints.adapter import save_adapter
from llamalit.checkpoints.common import fetch
from llamalit.checkpoints.fingerprint import base_fingerprint, file_sha256
from llamalit.checkpoints.lightning_ckpt import run_settings
from llamalit.checkpoints.native import save_model
from llamalit.data.text_formats import prompt_format
from llamalit.model.build import build_model
from llamalit.model.llama import Llama
from llamalit.model.lora import LoraConfig
from llamalit.utils.fileio import atomic_checkpoint_dir

if TYPE_CHECKING:
    import lightning as L

__all__ = ["EXPORT_NAMES", "copy_export", "export_weights", "exportable_model", "model_from_module_state"]


def model_from_module_state(cfg: Mapping, state: Mapping[str, torch.Tensor]) -> Llama:
    """A plain ``Llama`` (LoRA-wrapped for a LoRA run) holding a ``LlamaLitModule`` state dict's weights."""
    model = build_model(cfg["model"], cfg.get("lora"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def exportable_model(trainer: L.Trainer, module: L.LightningModule) -> Llama | None:
    """The trained model, whole, on rank 0 (None on the other ranks).

    Under FSDP each rank holds a shard of every parameter, so the full weights are gathered first; every
    rank must call this (the gather is collective). Otherwise it is ``module.model`` itself.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.model if trainer.is_global_zero else None
    state = trainer.strategy.lightning_module_state_dict()  # full_state_dict, gathered on rank 0
    return model_from_module_state(run_settings(module.hparams), state) if trainer.is_global_zero else None


def export_weights(model: Llama, out_dir: Path, tokenizer_path: str | None, cfg: dict) -> dict:
    """Weights only, loadable without Lightning: a full model as a Hugging Face directory plus
    ``llamalit.json``, or for a LoRA run the adapter alone (PEFT files plus ``llamalit_adapter.json``,
    which records the base and its fingerprint). Both record the prompt format the run's data taught
    (``template``: ``instruct_stories``, ``alpaca`` or ``plain``; ``llamalit.inference.templates``)."""
    files: dict[str, str] = {}
    tok = Path(tokenizer_path) if tokenizer_path and Path(tokenizer_path).is_file() else None
    extra = {"tokenizer": "tokenizer.model" if tok else tokenizer_path, "experiment": cfg.get("experiment_name")}
    if (data := cfg.get("data") or {}).get("kind"):  # the prompt format the data taught (chat/serve read it)
        extra["template"] = prompt_format(data["kind"], data.get("format") or "tinystories")
    if tok:
        extra["tokenizer_sha256"] = file_sha256(tok)
        files["tokenizer"] = str(out_dir / "tokenizer.model")
    if (cfg.get("lora") or {}).get("enabled"):
        if tok and tok.resolve() != (out_dir / "tokenizer.model").resolve():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tok, out_dir / "tokenizer.model")
        base = cfg.get("init_from")
        if base:
            extra.update(base_fingerprint(fetch(str(base))))
        save_adapter(model, out_dir, base=base, lora_cfg=LoraConfig.from_dict(cfg["lora"]), extra=extra)
        files["adapter"] = str(out_dir / "adapter_model.safetensors")
    else:
        save_model(model, out_dir, extra=extra, files={"tokenizer.model": tok} if tok else None)
        files["model"] = str(out_dir / "model.safetensors")
    return files


# What export_weights writes (and, last in the list, what earlier versions wrote)
EXPORT_NAMES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
                "llamalit.json", "adapter_model.safetensors", "adapter_config.json", "llamalit_adapter.json",
                "tokenizer.model", "README.md", "adapter.safetensors")


def copy_export(files: dict[str, str], dest: Path) -> None:
    """Publish a run's exported files to a shared place (e.g. where demo_lora finds the demo model), all
    together: an earlier export there is replaced whole, never mixed with this one."""
    folders = {Path(path).parent for path in files.values()}
    sources = {name: folder / name for folder in folders for name in EXPORT_NAMES if (folder / name).is_file()}
    commit = "adapter_config.json" if "adapter_config.json" in sources else "config.json"
    owned = (*sources, *EXPORT_NAMES)  # a weights-only export before this one (full or adapter) is replaced
    with atomic_checkpoint_dir(dest, owned=owned, commit=commit) as tmp:
        for name, src in sources.items():
            shutil.copyfile(src, tmp / name)
