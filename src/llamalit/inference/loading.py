"""A checkpoint ready to talk to: the model on its device, its tokenizer and its prompt template.

Checkpoint, tokenizer and device are resolved as ``llamalit-generate`` resolves them
(:func:`llamalit.cli.generate.resolve_device`, :func:`~llamalit.cli.generate.resolve_tokenizer`); the
template is the one the run recorded (:func:`llamalit.inference.templates.template_for`) or ``template=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamalit.data.tokenizer import Tokenizer
from llamalit.inference.templates import Template, template_for
from llamalit.model import Llama


@dataclass
class Loaded:
    model: Llama
    tokenizer: Tokenizer
    template: Template
    name: str  # the id clients ask for: the checkpoint's folder or file name


def load_for_serving(cfg: Mapping) -> Loaded:
    """Load ``cfg["ckpt"]`` (anything ``load_checkpoint`` reads; LoRA adapters merged) onto ``cfg["device"]``."""
    from llamalit.checkpoints.detect import fetch, load_checkpoint
    from llamalit.cli.generate import resolve_device, resolve_tokenizer
    from llamalit.data.download import default_cache_dir
    from llamalit.settings.checks import expand_paths, require

    require(cfg, "ckpt", "the checkpoint to serve (a path, URL or Hub id)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "tokenizer"))
    device = resolve_device(cfg.get("device"))
    local = fetch(cfg["ckpt"])
    template = template_for(local, cfg.get("template") or None)
    model = load_checkpoint(local)
    tok = Tokenizer(resolve_tokenizer(cfg.get("tokenizer"), local, model.cfg.vocab_size, default_cache_dir()))
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with (tokenizer=PATH)")
    local = Path(local)
    name = local.stem if local.is_file() else local.name
    return Loaded(model.to(device).eval(), tok, template, name or "llamalit")
