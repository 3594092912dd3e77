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
from torch import nn

from llamalit.checkpoints.common import CheckpointError, safe_torch_load, save_tensors
from llamalit.checkpoints.hf_layout import (
    config_from_hf,
    hf_config_dict,
    hf_name,
    permute_from_hf,
    to_hf_state_dict,
)
from llamalit.model.llama import Llama, ModelConfig, rope_tables
from llamalit.utils.fileio import atomic_checkpoint_dir, atomic_write_json

CONFIG = "config.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files of one Hugging Face model: replaced (or removed as stale) when save_hf writes another there.
HF_FILES = (CONFIG, "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
            "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


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


def _iter_hf_tensors(path: Path):
    """(file, HF name, tensor) over every shard, one tensor at a time (nothing else kept in memory)."""
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        yield f, k, st.get_tensor(k)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
        else:
            sd = safe_torch_load(f)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
            while sd:
                k, t = sd.popitem()
                yield f, k, t


def _safetensors_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, file name) from the safetensors headers alone (no tensor is read)."""
    shapes = {}
    for f in _weight_files(path):
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = (tuple(st.get_slice(k).get_shape()), f.name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
    return shapes


def _check_shape(path: Path, cfg: ModelConfig, ours: str, name: str, shape: tuple, file: str,
                 want: tuple) -> None:
    if tuple(shape) != tuple(want):
        raise CheckpointError(
            f"{path}: shape mismatch for {ours} ({name} in {file}): file has {tuple(shape)}, "
            f"{CONFIG} (hidden_size={cfg.dim}, num_attention_heads={cfg.n_heads}, num_key_value_heads="
            f"{cfg.n_kv_heads}, intermediate_size={cfg.hidden_dim}, vocab_size={cfg.vocab_size}) "
            f"needs {tuple(want)}")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, merged over shards (``.bin`` shards via weights_only torch.load)."""
    return {k: t for _, k, t in _iter_hf_tensors(Path(path))}


def read_hf_config(path: str | Path) -> tuple[dict, ModelConfig]:
    """``config.json`` of an HF Llama directory and our ModelConfig for it (unsupported variants refused)."""
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
    return hf, cfg


def _set_param(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    model.get_submodule(mod_name)._parameters[attr] = nn.Parameter(t, requires_grad=True)


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama:
    """Load a Hugging Face Llama directory (tied or untied head, GQA, any rope_theta / rms_norm_eps).

    The model is built on the meta device and each tensor is read (shard by shard, tensor by
    tensor), converted to ``dtype`` (default float32) on ``device`` and put in place, so peak
    memory stays near one copy of the model in ``dtype``. RoPE tables stay float32.
    """
    path = Path(path)
    dtype = dtype or torch.float32
    _, cfg = read_hf_config(path)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = model.state_dict()
    ours_by_hf = {hf_name(k): k for k in expected}
    if cfg.tie_embeddings:
        ours_by_hf.pop("lm_head.weight")  # the embedding is the head; a saved copy is ignored
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    headers = _safetensors_shapes(path)  # shapes checked in model order before anything is read
    for name, ours in ours_by_hf.items():
        if name in headers:
            _check_shape(path, cfg, ours, name, *headers[name], expected[ours].shape)
    loaded: set[str] = set()
    for f, name, t in _iter_hf_tensors(path):
        ours = ours_by_hf.get(name)
        if ours is None:  # rotary buffers, a tied lm_head copy
            continue
        _check_shape(path, cfg, ours, name, t.shape, f.name, expected[ours].shape)  # .bin shards
        t = t.to(device=device, dtype=dtype)
        kind = ours.rpartition(".weight")[0].rpartition(".")[2]
        if kind in heads:
            t = permute_from_hf(t, heads[kind])
        _set_param(model, ours, t.contiguous())
        loaded.add(ours)
        del t
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        loaded.add("output.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        if "tok_embeddings.weight" in missing:
            raise CheckpointError(f"{path}: no model.embed_tokens.weight; is this a LlamaForCausalLM checkpoint?")
        if missing == ["output.weight"]:
            raise CheckpointError(f"{path}: tie_word_embeddings is false but lm_head.weight is missing")
        raise CheckpointError(f"{path}: weights do not match {CONFIG}: missing "
                              f"{[hf_name(k) for k in missing[:5]]}{' ...' if len(missing) > 5 else ''}")
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.freqs_cos, model.freqs_sin = cos.to(device), sin.to(device)
    still_meta = [n for n, b in [*model.named_parameters(), *model.named_buffers()] if b.is_meta]
    if still_meta:  # a new parameter or buffer in Llama that this loader does not know
        raise CheckpointError(f"{path}: load_hf left {still_meta} unset; teach load_hf about them")
    return model


def _tokenizer_ids(tokenizer: Path) -> tuple[int, int]:
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        return sp.bos_id(), sp.eos_id()
    except Exception:  # not a sentencepiece model: keep Llama's ids
        return 1, 2


def save_hf(model: Llama, out_dir: str | Path, tokenizer: str | Path | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``generation_config.json`` (+ ``tokenizer.model``).

    ``dtype``: of the saved tensors (default float32; ``torch.bfloat16`` halves a merged 7B export).
    The files appear together (:func:`llamalit.utils.fileio.atomic_checkpoint_dir`): a directory holding
    only Hugging Face model files (an earlier export) is replaced whole; other files are kept, and
    stale model files there (shards, index, ``tokenizer.json`` of another model) removed.
    """
    out_dir = Path(out_dir)
    with atomic_checkpoint_dir(out_dir, owned=HF_FILES, commit=CONFIG) as tmp:
        write_hf_files(model, tmp, tokenizer, dtype)
    return out_dir


def write_hf_files(model: Llama, folder: Path, tokenizer: str | Path | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """The files of :func:`save_hf`, written straight into ``folder`` (the caller publishes it atomically)."""
    dtype = dtype or torch.float32
    sd = model.state_dict()
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise CheckpointError(f"save_hf: the model still has LoRA weights ({lora[0]} ...); merge them first "
                              "(merge_lora) or export the adapter with save_peft")
    cfg = model.cfg
    tensors = to_hf_state_dict({k: v.detach().to(dtype) for k, v in sd.items()}, cfg)
    bos, eos = _tokenizer_ids(Path(tokenizer)) if tokenizer else (1, 2)
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "generation_config.json",
                      {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos})
    if tokenizer:
        shutil.copyfile(tokenizer, folder / "tokenizer.model")
        atomic_write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True,
            "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
        })
    atomic_write_json(folder / CONFIG, {**hf_config_dict(cfg), "bos_token_id": bos, "eos_token_id": eos,
                                        "torch_dtype": str(dtype).removeprefix("torch.")})
