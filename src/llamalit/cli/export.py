"""``python scripts/export.py ckpt=PATH format=FORMAT out=PATH`` / ``llamalit-export``.

FORMAT: ``llama2c`` (v0 ``.bin`` for llama2.c ``run.c``, with ``tokenizer.bin`` and ``tokenizer.model`` beside it),
``llama2c_v1``, ``llama2c_q8`` (v2 for ``runq.c``), ``hf``, ``peft`` (a LoRA checkpoint's adapter,
with its base as an HF dir in ``OUT/base``), ``merged`` (LoRA folded in, our own format), ``gguf`` (llama.cpp;
``dtype=f32|f16|bf16|q8_0``; LoRA merged in, or with ``adapter=true`` the adapter alone as llama.cpp's adapter GGUF).
For the ``.bin`` and ``.gguf`` formats ``out`` is the file (``OUT/model.bin`` / ``OUT/model.gguf`` when ``out`` is a
directory).
Nothing is written over the source checkpoint, nor over an existing ``out`` unless ``overwrite=true``;
every setting and the tokenizer are checked before the first file is written.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH
from llamalit.utils.fileio import atomic_path
from llamalit.utils.hub import require_checkpoint

BIN_VERSIONS = {"llama2c": 0, "llama2c_v1": 1, "llama2c_q8": 2}
DIR_FORMATS = ("hf", "peft", "merged")
FORMATS = (*BIN_VERSIONS, *DIR_FORMATS, "gguf")


def _bin_path(out: Path, fmt: str = "llama2c") -> Path:
    name = "model.gguf" if fmt == "gguf" else "model.bin"
    return out / name if out.is_dir() or (not out.exists() and not out.suffix) else out


def _flag(cfg: Mapping, key: str) -> bool:
    value = cfg.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: use true or false")
    return value


def _group_size(cfg: Mapping) -> int:
    value = cfg.get("group_size")
    if value is None:
        return 64
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group_size={value!r}: must be an integer >= 1 (the Q8_0 group size of format=llama2c_q8; "
                         "llama2.c uses 64)")
    return value


def q8_group(group_size: int, dim: int, hidden_dim: int) -> int:
    """``group_size`` halved until it divides ``dim`` and ``hidden_dim``.

    llama2.c's export.py halves only until it divides ``dim``, but runq.c's matmul and quantize work
    in whole groups along every input row, so w2 (rows of ``hidden_dim``) needs it to divide that too.
    """
    group = group_size
    while dim % group or hidden_dim % group:
        group //= 2
    return group


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies under it (both resolved, so links and ``..`` do not fool it)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _occupied(path: Path) -> str | None:
    if path.is_dir():
        return "is a directory that is not empty" if any(path.iterdir()) else None
    return "already exists" if path.exists() or path.is_symlink() else None


def _tokenizer_files(bin_path: Path, tok: Path) -> list[Path]:
    """Written beside a llama2.c ``.bin``: ``tokenizer.bin`` for run.c, and ``tokenizer.model`` so that
    generate.py and evaluate.py find the tokenizer beside the weights (unless it is already that file)."""
    model = bin_path.with_name("tokenizer.model")
    return [bin_path.with_name("tokenizer.bin")] + ([] if model.resolve() == tok.resolve() else [model])


def _check_out(fmt: str, out: Path, source: Path, tok: Path | None, overwrite: bool) -> None:
    """Refuse to write over or into the source checkpoint, and over anything at ``out`` unless ``overwrite``."""
    if fmt in DIR_FORMATS:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out={out}: is a file, but format={fmt} writes a directory; out must be a directory "
                             "(a new or empty one)")
        targets = [out]
        if _inside(source, out):
            raise ValueError(f"out={out}: is or holds the source checkpoint {source}, which writing format={fmt} "
                             "there would replace; pick a new path for out= (overwrite=true does not allow this)")
    else:
        path = _bin_path(out, fmt)
        targets = [path, *_tokenizer_files(path, tok)] if fmt == "llama2c" and tok is not None else [path]
    for target in targets:
        if _inside(target, source):
            raise ValueError(f"out={out}: the export would write {target}, which is or lies inside the source "
                             f"checkpoint {source}; pick a new path for out= (overwrite=true does not allow this)")
    if overwrite:
        return
    for target in dict.fromkeys([out, *targets]):
        if why := _occupied(target):
            raise FileExistsError(f"out={out}: {target} {why}; pick a new path for out= or pass overwrite=true to "
                                  "replace it")


def _tokenizer(cfg: Mapping, local: Path) -> Path | None:
    """The tokenizer file (``tokenizer=`` or the checkpoint's), parsed here so a bad one fails before writing."""
    from llamalit.checkpoints import find_tokenizer
    from llamalit.data.download import default_cache_dir
    from llamalit.data.tokenizer import Tokenizer, TokenizerError, fetch_tokenizer

    given = cfg.get("tokenizer")
    path = fetch_tokenizer(str(given), default_cache_dir(), key="tokenizer") if given else find_tokenizer(local)
    if path is not None:
        try:
            Tokenizer(path)
        except TokenizerError as e:
            what = f"fix tokenizer={given}" if given else f"it is the one {local} names or holds; pass tokenizer=PATH"
            raise TokenizerError(f"{e}; {what} (a SentencePiece .model)") from e
    return path


def _check_vocab(tok: Path, fmt: str, vocab_size: int) -> None:
    from llamalit.data.tokenizer import Tokenizer

    n = Tokenizer(tok).vocab_size
    if n > vocab_size or (fmt == "llama2c" and n != vocab_size):
        raise ValueError(f"tokenizer {tok} has {n} pieces but the model's vocab_size is {vocab_size}; "
                         "pass the tokenizer the model was trained with (tokenizer=PATH)")


def _copy(src: Path, dest: Path) -> None:
    if src.resolve() != dest.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def run_export(cfg: Mapping) -> list[Path]:
    """Convert ``cfg['ckpt']`` to ``cfg['format']`` at ``cfg['out']``; return the files/dirs written."""
    from llamalit.settings.checks import expand_paths, require

    require(cfg, "ckpt", "the checkpoint to convert (a path or URL)")
    require(cfg, "format", f"one of {list(FORMATS)}")
    require(cfg, "out", "where to write (a file for the .bin formats, a directory for the others)")
    cfg = dict(cfg)
    expand_paths(cfg, ("ckpt", "out", "tokenizer"))
    fmt, out = str(cfg["format"]), Path(str(cfg["out"])).expanduser()
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {list(FORMATS)}")
    overwrite, group_size, adapter = _flag(cfg, "overwrite"), _group_size(cfg), _flag(cfg, "adapter")
    dtype = _gguf_settings(cfg, fmt, adapter)
    require_checkpoint(cfg["ckpt"])
    from llamalit.checkpoints.detect import fetch, load_checkpoint  # torch: after the checks that need none

    local = fetch(cfg["ckpt"])
    tok = _tokenizer(cfg, local)
    if fmt == "gguf" and tok is None and not adapter:
        raise ValueError(f"format=gguf: no tokenizer found for {local}, and a GGUF carries its vocabulary; pass "
                         "tokenizer=PATH (the SentencePiece .model the model was trained with)")
    # a model.safetensors / config.json path stands for the directory it is in (as load_checkpoint reads it)
    source = local.parent if local.is_file() and local.suffix in (".safetensors", ".json") else local
    _check_out(fmt, out, source, tok, overwrite)
    model = load_checkpoint(local, merge=fmt != "peft" and not adapter)
    if tok is not None:
        _check_vocab(tok, fmt, model.cfg.vocab_size)
    if fmt == "llama2c_q8" and (g := q8_group(group_size, model.cfg.dim, model.cfg.hidden_dim)) != group_size:
        print(f"note: group_size={group_size} -> {g}: halved until it divides dim={model.cfg.dim} and "
              f"hidden_dim={model.cfg.hidden_dim}, as llama2.c's runq.c needs", file=sys.stderr)
        group_size = g
    if fmt == "llama2c" and tok is None:
        print(f"warning: no tokenizer found for {local}; tokenizer.bin not written (pass tokenizer=PATH)",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llamalit-export-") as stage:
        if tok is not None and fmt in DIR_FORMATS and _inside(tok, out):  # out is replaced: keep a copy to read
            tok = Path(shutil.copyfile(tok, Path(stage) / "tokenizer.model"))
        if fmt == "gguf":
            return [_write_gguf(model, _bin_path(out, fmt), local, tok, dtype, adapter)]
        return _write(fmt, model, out, local, tok, group_size)


def _gguf_settings(cfg: Mapping, fmt: str, adapter: bool) -> str:
    """``dtype`` of format=gguf (f16 when unset), checked; ``dtype``/``adapter`` with another format is refused."""
    dtype = cfg.get("dtype")
    if fmt != "gguf":
        if dtype is not None or adapter:
            key = "dtype" if dtype is not None else "adapter"
            raise ValueError(f"{key}={cfg.get(key)!r}: applies to format=gguf only (format={fmt}); leave it out")
        return ""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ValueError("format=gguf needs llama.cpp's gguf package: pip install gguf (or llamalit[gguf])") from e
    from llamalit.checkpoints.gguf import check_dtype

    return check_dtype(str(dtype) if dtype is not None else "f16")


def _write_gguf(model, path: Path, local: Path, tok: Path | None, dtype: str, adapter: bool) -> Path:
    from llamalit.checkpoints.gguf import save_gguf, save_gguf_adapter

    name = (local.stem if local.is_file() else local.name) or path.stem
    if adapter:
        return save_gguf_adapter(model, path, dtype=dtype, name=name)
    return save_gguf(model, path, tok, dtype=dtype, chat_template=_chat_template(local), name=name)


def _chat_template(local: Path) -> str | None:
    """The Jinja chat template of the checkpoint's prompt format (``inference.templates.template_for``: what its
    run recorded, else a ``tokenizer_config.json`` / ``chat_template.jinja`` beside it); None for formats Jinja
    cannot express (``instruct_stories``, ``plain``)."""
    from llamalit.inference.jinja_templates import jinja_template
    from llamalit.inference.templates import HFChatTemplate, template_for

    template = template_for(local)
    return template.chat_template if isinstance(template, HFChatTemplate) else jinja_template(template.name)


def _write(fmt: str, model, out: Path, local: Path, tok: Path | None, group_size: int) -> list[Path]:
    from llamalit.checkpoints import save_hf, save_llama2c_bin, save_model, save_peft
    from llamalit.checkpoints.llama2c import CheckpointError, model_from_state_dict

    written: list[Path] = []
    if fmt == "peft":
        from llamalit.model.lora import lora_layers

        if not lora_layers(model):
            raise CheckpointError(f"{local}: no LoRA adapters to export as PEFT; use format=hf for a plain model")
        base_sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        base = model_from_state_dict(model.cfg, base_sd, f"{local} (base weights)")
        # the adapter dir first: its writer may replace OUT as a whole, and the base lives in OUT/base
        written.append(save_peft(model, out, base=str((out / "base").resolve())))
        written.insert(0, save_hf(base, out / "base", tokenizer=tok))
        return written
    if fmt in BIN_VERSIONS:
        path = save_llama2c_bin(model, _bin_path(out), BIN_VERSIONS[fmt], group_size)
        written.append(path)
        if fmt == "llama2c" and tok is not None:
            from llamalit.data.tokenizer import write_llama2c_tokenizer_bin

            tok_bin, *tok_model = _tokenizer_files(path, tok)
            written.append(write_llama2c_tokenizer_bin(tok, tok_bin))
            for dest in tok_model:
                _copy(tok, dest)
                written.append(dest)
    elif fmt == "hf":
        written.append(save_hf(model, out, tokenizer=tok))
    else:  # merged; the tokenizer goes in after the weights, as the writer may replace OUT as a whole
        written.append(save_model(model, out, extra={"tokenizer": "tokenizer.model"} if tok is not None else {}))
        if tok is not None:
            _copy(tok, out / "tokenizer.model")
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    from llamalit.cli import user_errors

    with user_errors():
        written = run_export(OmegaConf.to_container(cfg, resolve=True))
    for path in written:
        print(f"wrote {path}")


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
