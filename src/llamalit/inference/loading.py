"""A checkpoint ready to run: the model on its device, its tokenizer, and for talking to it its prompt template.

Every command that runs a trained model (generate, chat, serve, evaluate, the harness) loads it here. The
checkpoint is anything ``load_checkpoint`` reads. The tokenizer is ``tokenizer=`` when given, else the one
the checkpoint's ``config.json`` names or a ``tokenizer.model`` beside it, else (for a 32000-piece model such
as llama2.c's stories checkpoints) the Llama 2 tokenizer from llama2.c. The template is the one the run
recorded (:func:`llamalit.inference.templates.template_for`) or ``template=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamalit.data.tokenizer import Tokenizer
from llamalit.inference.templates import Template, template_for
from llamalit.model import Llama

LLAMA2_TOKENIZER_URL = "https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.model"
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
LLAMA2_VOCAB = 32000


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | None) -> torch.device:
    """``auto``: CUDA when available, else Apple MPS, else CPU; anything else as torch spells it.

    A device that is not there (``cuda`` without a GPU, ``cuda:3`` with one) is a ValueError naming it.
    """
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError as e:
        raise ValueError(f"device={name!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={name}: no CUDA GPU is visible; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={name}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}); "
                             "pick one of those or use device=auto")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device={name}: Apple MPS is not available here; use device=cpu or device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_tokenizer(given: str | None, ckpt_local: Path, vocab_size: int, cache_dir: str | Path) -> Path:
    """The tokenizer file to use (see the module docstring); a clear error when there is none."""
    from llamalit.checkpoints import find_tokenizer
    from llamalit.data.tokenizer import fetch_tokenizer

    if given:
        return fetch_tokenizer(str(given), cache_dir, key="tokenizer")
    found = find_tokenizer(ckpt_local)
    if found is not None:
        return found
    if vocab_size == LLAMA2_VOCAB:
        return fetch_tokenizer(LLAMA2_TOKENIZER_URL, cache_dir, sha256=LLAMA2_TOKENIZER_SHA256)
    raise FileNotFoundError(
        f"no tokenizer for {ckpt_local}: none named in its config.json and no tokenizer.model beside it; "
        "pass tokenizer=PATH (a SentencePiece .model)"
    )


def load_for_sampling(cfg: Mapping) -> tuple[Llama, Tokenizer, Path]:
    """The model of ``cfg["ckpt"]`` (anything ``load_checkpoint`` reads) on ``cfg["device"]`` and its tokenizer
    (``cfg["tokenizer"]`` or :func:`resolve_tokenizer`'s), checked to agree; and the checkpoint's local path."""
    from llamalit.checkpoints.detect import fetch, load_checkpoint
    from llamalit.data.download import default_cache_dir

    device = resolve_device(cfg.get("device"))
    local = fetch(cfg["ckpt"])
    model = load_checkpoint(local)
    tok = Tokenizer(resolve_tokenizer(cfg.get("tokenizer"), local, model.cfg.vocab_size, default_cache_dir()))
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with")
    return model.to(device), tok, local


def pick_tokenizer(cfg: Mapping, ckpt_local: Path, vocab_size: int) -> Path:
    """The tokenizer file to use (see the module docstring)."""
    cache_dir = (cfg.get("paths") or {}).get("cache_dir", "~/.cache/llamalit")
    try:
        return resolve_tokenizer(cfg.get("tokenizer"), ckpt_local, vocab_size, cache_dir)
    except FileNotFoundError:
        data_dir = (cfg.get("data") or {}).get("dir")
        candidate = Path(str(data_dir)).expanduser() / "tokenizer.model" if data_dir else None
        if candidate is not None and candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"no tokenizer for {ckpt_local}: none named in its config.json, no tokenizer.model beside it, "
            f"none in data.dir={data_dir}; pass tokenizer=PATH (the SentencePiece .model it was trained with)"
        ) from None


@dataclass
class Loaded:
    model: Llama
    tokenizer: Tokenizer
    template: Template
    name: str  # the id clients ask for: the checkpoint's folder or file name


def load_for_serving(cfg: Mapping) -> Loaded:
    """Load ``cfg["ckpt"]`` (anything ``load_checkpoint`` reads; LoRA adapters merged) onto ``cfg["device"]``,
    with its template."""
    from llamalit.settings.checks import expand_paths, require

    require(cfg, "ckpt", "the checkpoint to serve (a path, URL or Hub id)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "tokenizer"))
    model, tok, local = load_for_sampling(cfg)
    template = template_for(local, cfg.get("template") or None)
    local = Path(local)
    name = local.stem if local.is_file() else local.name
    return Loaded(model.eval(), tok, template, name or "llamalit")
