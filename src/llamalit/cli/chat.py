"""``python chat.py ckpt=PATH`` / ``llamalit-chat``: a streamed terminal conversation with a checkpoint.

The model and tokenizer load as in ``generate.py`` (:func:`llamalit.inference.loading.load_for_sampling`); the
prompt format is ``template=`` or the one the checkpoint says (:func:`llamalit.inference.templates.template_for`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH


def run_chat(cfg: Mapping, lines: Iterable[str] | None = None, out: TextIO | None = None,
             info: TextIO | None = None) -> None:
    """Check the settings, load, then converse: ``lines`` (default: the terminal) in, replies to ``out``
    (stdout), notices to ``info`` (stderr)."""
    from llamalit.inference.chat import HELP, ChatSession, run_session
    from llamalit.inference.loading import load_for_sampling
    from llamalit.inference.templates import TEMPLATES, template_for
    from llamalit.settings.checks import expand_paths, require

    require(cfg, "ckpt", "the checkpoint to talk to (a path, URL or Hub id)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "tokenizer"))
    out, info = out or sys.stdout, info or sys.stderr
    if cfg.get("template") and cfg["template"] not in TEMPLATES:  # before the (slow) load
        raise ValueError(f"template={cfg['template']!r}: unknown; use one of {', '.join(TEMPLATES)}")
    ChatSession.check({k: cfg.get(k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")})
    model, tok, local = load_for_sampling(cfg)
    template = template_for(local, cfg.get("template"))
    session = ChatSession(model, tok, template, cfg, out=out, info=info, system=cfg.get("system"))
    device = next(model.parameters()).device
    print(f"[{local.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
          f"context {model.cfg.max_seq_len} tokens, template {template.name}]\n[{HELP}]", file=info, flush=True)
    if lines is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    run_session(session, lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="chat")
def hydra_main(cfg: DictConfig) -> None:
    from llamalit.cli import user_errors

    with user_errors():
        run_chat(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
