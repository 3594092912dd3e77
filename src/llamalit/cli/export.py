"""``python scripts/export.py ckpt=PATH format=FORMAT out=PATH`` / ``llamalit-export``.

FORMAT: ``llama2c`` (v0 ``.bin`` for llama2.c ``run.c`` + ``tokenizer.bin`` beside it),
``llama2c_v1``, ``llama2c_q8`` (v2 for ``runq.c``), ``hf``, ``peft`` (a LoRA checkpoint's adapter,
with its base as an HF dir in ``OUT/base``), ``merged`` (LoRA folded in, our own format).
For the ``.bin`` formats ``out`` is the file (``OUT/model.bin`` when ``out`` is a directory).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.data.download import DownloadError
from llamalit.fileio import atomic_path

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
BIN_VERSIONS = {"llama2c": 0, "llama2c_v1": 1, "llama2c_q8": 2}
FORMATS = (*BIN_VERSIONS, "hf", "peft", "merged")


def _bin_path(out: Path) -> Path:
    return out / "model.bin" if out.is_dir() or not out.suffix else out


def _tokenizer(cfg: Mapping, local: Path) -> Path | None:
    from llamalit.checkpoints import find_tokenizer
    from llamalit.data.download import default_cache_dir
    from llamalit.data.tokenizer import fetch_tokenizer

    if cfg.get("tokenizer"):
        return fetch_tokenizer(str(cfg["tokenizer"]), default_cache_dir())
    return find_tokenizer(local)


def _copy(src: Path, dest: Path) -> None:
    if src.resolve() != dest.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def run_export(cfg: Mapping) -> list[Path]:
    """Convert ``cfg['ckpt']`` to ``cfg['format']`` at ``cfg['out']``; return the files/dirs written."""
    from llamalit.checkpoints import save_hf, save_llama2c_bin, save_model, save_peft
    from llamalit.checkpoints.detect import fetch, load_checkpoint
    from llamalit.checkpoints.llama2c import CheckpointError, model_from_state_dict

    fmt, out = str(cfg["format"]), Path(str(cfg["out"])).expanduser()
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {list(FORMATS)}")
    local = fetch(cfg["ckpt"])
    tok = _tokenizer(cfg, local)
    written: list[Path] = []
    if fmt == "peft":
        from llamalit.lora import lora_layers

        model = load_checkpoint(local, merge=False)
        if not lora_layers(model):
            raise CheckpointError(f"{local}: no LoRA adapters to export as PEFT; use format=hf for a plain model")
        base_sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        base = model_from_state_dict(model.cfg, base_sd, f"{local} (base weights)")
        written.append(save_hf(base, out / "base", tokenizer=tok))
        written.append(save_peft(model, out, base=str((out / "base").resolve())))
        return written
    model = load_checkpoint(local)
    if fmt in BIN_VERSIONS:
        path = save_llama2c_bin(model, _bin_path(out), BIN_VERSIONS[fmt], int(cfg.get("group_size") or 64))
        written.append(path)
        if fmt == "llama2c":
            if tok is None:
                print(f"warning: no tokenizer found for {local}; tokenizer.bin not written (pass tokenizer=PATH)",
                      file=sys.stderr)
            else:
                from llamalit.data.tokenizer import write_llama2c_tokenizer_bin

                written.append(write_llama2c_tokenizer_bin(tok, path.with_name("tokenizer.bin")))
    elif fmt == "hf":
        written.append(save_hf(model, out, tokenizer=tok))
    else:  # merged
        extra = {}
        if tok is not None:
            _copy(tok, out / "tokenizer.model")
            extra["tokenizer"] = "tokenizer.model"
        written.append(save_model(model, out, extra=extra))
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        written = run_export(OmegaConf.to_container(cfg, resolve=True))
    except (OSError, ValueError, DownloadError) as e:  # bad path, format or checkpoint: the message says which
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
