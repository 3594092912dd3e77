"""The ``merge_and_unload`` step of QLoRA: fold a trained adapter into a fresh reload of its base, save as HF.

A QLoRA run trains adapters on a 4-bit base, and 4-bit weights cannot take the update (merging
would re-quantize it away). So the base is read again in ``dtype`` (bf16 by default, as the QLoRA
guide does), the same LoRA layers are applied, the adapter tensors loaded and merged, and the
result written as a Hugging Face directory that ``transformers`` (and ``load_checkpoint``) read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamalit.checkpoints import hf
from llamalit.checkpoints.common import CheckpointError, fetch
from llamalit.checkpoints.detect import load_checkpoint
from llamalit.checkpoints.tokenizer import find_tokenizer
from llamalit.model.build import build_model
from llamalit.model.llama import Llama
from llamalit.model.lora import load_lora_state_dict, merge_lora
from llamalit.utils.fileio import atomic_dir


def load_base(base: str | Path, dtype: torch.dtype = torch.bfloat16) -> Llama:
    """The base model in ``dtype`` on the CPU: HF directories straight into ``dtype`` (one copy in memory),
    any other format through ``load_checkpoint`` (float32, then cast)."""
    path = fetch(base)
    if hf.is_hf_dir(path):
        return hf.load_hf(path, dtype=dtype).eval()
    return load_checkpoint(path).to(dtype).eval()


def export_merged_hf(base: str | Path, adapter_sd: dict[str, torch.Tensor], lora_cfg, out_dir: str | Path,
                     dtype: torch.dtype = torch.bfloat16, tokenizer: str | Path | None = None) -> Path:
    """Merge ``adapter_sd`` (``lora_state_dict`` of a LoRA or QLoRA model) into ``base`` and save an HF dir.

    ``base``: the checkpoint the adapter was trained on (an HF directory, or anything
    ``load_checkpoint`` reads), reloaded unquantized in ``dtype``; ``lora_cfg``: the ``LoraConfig``
    it was trained with. ``tokenizer``: copied into the export (default: the base's
    ``tokenizer.model`` if it has one). ``out_dir`` appears complete or not at all (written beside
    it, then renamed); an earlier export there is replaced, any other non-empty directory refused.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or hf.is_hf_dir(out_dir))):
        raise FileExistsError(f"export_merged_hf: {out_dir} exists and is not an earlier Hugging Face export; "
                              "choose a new or empty directory")
    model = build_model(None, lora_cfg, init_from=load_base(base, dtype))
    try:
        load_lora_state_dict(model, adapter_sd)
    except ValueError as e:
        raise CheckpointError(f"export_merged_hf: the adapter does not fit base {base} with {lora_cfg}: {e}") from e
    merge_lora(model)
    if tokenizer is None and Path(str(base)).expanduser().is_dir():
        tokenizer = find_tokenizer(Path(str(base)).expanduser())
    with atomic_dir(out_dir) as tmp:  # an earlier export there is replaced whole, once the new one is complete
        hf.save_hf(model, tmp, tokenizer=tokenizer, dtype=dtype)
    return out_dir
