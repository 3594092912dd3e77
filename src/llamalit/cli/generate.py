"""``python generate.py ckpt=PATH prompt="..."`` / ``llamalit-generate``: stream a sample to stdout.

The checkpoint is anything ``load_checkpoint`` reads. The tokenizer is ``tokenizer=`` when given,
else the one the checkpoint's ``config.json`` names or a ``tokenizer.model`` beside it, else (for a
32000-piece model such as llama2.c's stories checkpoints) the Llama 2 tokenizer from llama2.c.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH


def run_generate(cfg: Mapping, out: TextIO | None = None) -> list[int]:
    """Load, encode the prompt, stream the sample to ``out`` (stdout); return the new token ids."""
    from llamalit.settings.checks import expand_paths, require
    from llamalit.utils.hub import require_checkpoint

    require(cfg, "ckpt", "the checkpoint to sample from (a path or URL)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "tokenizer"))
    require_checkpoint(cfg["ckpt"])  # before torch is imported: a mistyped path is reported at once
    from llamalit.inference.generate import check_sampling_args, generate_stream
    from llamalit.inference.loading import load_for_sampling
    from llamalit.inference.streaming import StreamDecoder

    out = out if out is not None else sys.stdout
    max_new_setting = cfg.get("max_new_tokens")  # null: fill the context
    top_k, top_p, seed = cfg.get("top_k"), cfg.get("top_p"), cfg.get("seed")
    temperature = cfg.get("temperature", 1.0)
    # every setting is checked before anything is loaded or printed (1 stands in for a null max_new_tokens)
    check_sampling_args(1 if max_new_setting is None else max_new_setting, temperature, top_k, top_p, seed)
    model, tok, _ = load_for_sampling(cfg)
    prompt_ids = tok.encode(cfg.get("prompt") or "", bos=True, eos=False)
    room = model.cfg.max_seq_len - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt: {len(prompt_ids)} tokens (with BOS) fill the model's context of "
                         f"{model.cfg.max_seq_len}; shorten the prompt")
    max_new = room if max_new_setting is None else min(int(max_new_setting), room)  # capped by the context
    eos = tok.eos_id if cfg.get("stop_at_eos", True) else None

    stream = StreamDecoder(tok, prompt_ids)
    out.write(stream.emitted)
    out.flush()
    new_ids = []
    for token_id in generate_stream(model, prompt_ids, max_new, temperature=temperature,
                                    top_k=top_k, top_p=top_p, eos_id=eos, seed=seed):
        new_ids.append(token_id)
        piece = stream.push(token_id)
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    return new_ids


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    from llamalit.cli import user_errors

    with user_errors():
        run_generate(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
