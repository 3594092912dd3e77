"""Hugging Face Llama directories: ``config.json`` + ``model.safetensors`` (or sharded, or ``.bin``).

Reading needs only safetensors; ``transformers`` is needed by nobody here, but what
:func:`save_hf` writes loads with ``transformers.LlamaForCausalLM.from_pretrained``.
wq/wk rows are permuted between llama2.c's adjacent-pair RoPE layout and HF's half-split one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from llamalit.checkpoints.hf_layout import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    to_hf_state_dict,
)
from llamalit.checkpoints.llama2c import CheckpointError, model_from_state_dict, safe_torch_load
from llamalit.checkpoints.native import save_tensors
from llamalit.fileio import atomic_path, atomic_write_json
from llamalit.model import Llama

CONFIG = "config.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a Llama ``config.json`` and weights (single file or sharded index)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    if not any((path / n).is_file() for n in (*_WEIGHT_FILES, *_INDEX_FILES)):
        return False
    try:
        hf = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(hf, dict) and ("model_type" in hf or "architectures" in hf)


def _check_supported(path: Path, hf: dict) -> None:
    problems = []
    if hf.get("model_type", "llama") != "llama":
        problems.append(f"model_type={hf.get('model_type')!r} (only 'llama')")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention/mlp biases")
    rope_scaling = hf.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_scaling and rope_type != "default":
        problems.append(f"rope_scaling={rope_scaling}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise CheckpointError(f"{path / CONFIG}: unsupported Llama variant: {', '.join(problems)}")


def _weight_files(path: Path) -> list[Path]:
    for index in _INDEX_FILES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text()).get("weight_map") or {}
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path / index}: shard files missing: {missing}")
            return files
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(f"{path}: no {' / '.join(_WEIGHT_FILES + _INDEX_FILES)}")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, merged over shards (``.bin`` shards via weights_only torch.load)."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        out[k] = st.get_tensor(k)
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
        else:
            sd = safe_torch_load(f)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
            out.update(sd)
    return out


def load_hf(path: str | Path) -> Llama:
    """Load a Hugging Face Llama directory (tied or untied head, GQA, any rope_theta / rms_norm_eps)."""
    path = Path(path)
    try:
        hf = json.loads((path / CONFIG).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no {CONFIG}; is this a Hugging Face model directory?") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG}: invalid JSON ({e})") from e
    try:
        cfg = config_from_hf(hf)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from e
    _check_supported(path, hf)
    theirs = read_hf_state_dict(path)
    if "model.embed_tokens.weight" not in theirs:
        raise CheckpointError(f"{path}: no model.embed_tokens.weight; is this a LlamaForCausalLM checkpoint?")
    if not cfg.tie_embeddings and "lm_head.weight" not in theirs:
        raise CheckpointError(f"{path}: tie_word_embeddings is false but lm_head.weight is missing")
    try:
        ours = from_hf_state_dict(theirs, cfg)
    except RuntimeError as e:  # a view with the wrong shape during the RoPE permutation
        raise CheckpointError(f"{path}: shape mismatch while converting q_proj/k_proj ({e})") from e
    return model_from_state_dict(cfg, {k: v.float() for k, v in ours.items()}, path)


def _tokenizer_ids(tokenizer: Path) -> tuple[int, int]:
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        return sp.bos_id(), sp.eos_id()
    except Exception:  # not a sentencepiece model: keep Llama's ids
        return 1, 2


def save_hf(model: Llama, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``generation_config.json`` (+ ``tokenizer.model``)."""
    out_dir = Path(out_dir)
    sd = model.state_dict()
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise CheckpointError(f"save_hf: the model still has LoRA weights ({lora[0]} ...); merge them first "
                              "(merge_lora) or export the adapter with save_peft")
    cfg = model.cfg
    tensors = to_hf_state_dict({k: v.detach().float() for k, v in sd.items()}, cfg)
    bos, eos = _tokenizer_ids(Path(tokenizer)) if tokenizer else (1, 2)
    save_tensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG, {**hf_config_dict(cfg), "bos_token_id": bos, "eos_token_id": eos})
    atomic_write_json(out_dir / "generation_config.json",
                      {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos})
    if tokenizer:
        with atomic_path(out_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer, tmp)
        atomic_write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True,
            "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
        })
    return out_dir
