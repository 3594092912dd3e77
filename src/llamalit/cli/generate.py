"""``python generate.py ckpt=PATH prompt="..."`` / ``llamalit-generate``: stream a sample to stdout.

The checkpoint is anything ``load_checkpoint`` reads. The tokenizer is ``tokenizer=`` when given,
else the one the checkpoint's ``config.json`` names or a ``tokenizer.model`` beside it, else (for a
32000-piece model such as llama2.c's stories checkpoints) the Llama 2 tokenizer from llama2.c.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH

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


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete multi-byte characters.

    It decodes the whole sequence (prompt included, so leading spaces come out right) and emits
    what is new; text ending in U+FFFD (an unfinished UTF-8 byte sequence) waits for more bytes.
    """

    def __init__(self, tokenizer, prefix_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prefix_ids)
        self.emitted = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tok.decode(self.ids))

    def _emit(self, text: str) -> str:
        n = len(self.emitted) if text.startswith(self.emitted) else _common_prefix(text, self.emitted)
        new, self.emitted = text[n:], text
        return new


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_generate(cfg: Mapping, out: TextIO | None = None) -> list[int]:
    """Load, encode the prompt, stream the sample to ``out`` (stdout); return the new token ids."""
    from llamalit.checkpoints.detect import fetch, load_checkpoint
    from llamalit.data.download import default_cache_dir
    from llamalit.data.tokenizer import Tokenizer
    from llamalit.inference.generate import check_sampling_args, generate_stream
    from llamalit.settings.checks import expand_paths, require

    require(cfg, "ckpt", "the checkpoint to sample from (a path or URL)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "tokenizer"))
    out = out if out is not None else sys.stdout
    max_new_setting = cfg.get("max_new_tokens")  # null: fill the context
    top_k, top_p, seed = cfg.get("top_k"), cfg.get("top_p"), cfg.get("seed")
    temperature = cfg.get("temperature", 1.0)
    # every setting is checked before anything is loaded or printed (1 stands in for a null max_new_tokens)
    check_sampling_args(1 if max_new_setting is None else max_new_setting, temperature, top_k, top_p, seed)
    device = resolve_device(cfg.get("device"))
    local = fetch(cfg["ckpt"])
    model = load_checkpoint(local)
    tok = Tokenizer(resolve_tokenizer(cfg.get("tokenizer"), local, model.cfg.vocab_size, default_cache_dir()))
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with")
    model.to(device)
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
