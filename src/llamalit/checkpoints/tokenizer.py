"""The tokenizer that goes with a checkpoint: the one its config names, one beside it, or its base's."""

from __future__ import annotations

import json
from pathlib import Path

from llamalit.checkpoints.common import resolve_relative


def find_tokenizer(ckpt: str | Path, _follow_base: bool = True) -> Path | None:
    """The tokenizer a checkpoint names (``config.json`` "tokenizer") or a ``tokenizer.model`` beside it;
    for an adapter, else its base's (the local directory its adapter config names).

    For a file (e.g. ``RUN/checkpoints/last.ckpt``) its folder is searched, then the folder above.
    """
    path = Path(ckpt)
    folders = [path] if path.is_dir() else [path.parent, path.parent.parent]
    found = _tokenizer_in(folders)
    if found is None and _follow_base and path.is_dir():
        base = _adapter_base(path)
        found = find_tokenizer(base, _follow_base=False) if base is not None else None
    return found


def _adapter_base(folder: Path) -> Path | None:
    """The local base directory an adapter config names (PEFT "base_model_name_or_path", ours "base")."""
    for name in ("llamalit_adapter.json", "adapter_config.json"):
        try:
            meta = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        for key in ("base_model_name_or_path", "base"):
            ref = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(ref, str) and ref and (base := Path(resolve_relative(ref, folder))).is_dir():
                return base
    return None


def _tokenizer_in(folders: list[Path]) -> Path | None:
    for folder in folders:
        for cfg_name in ("llamalit.json", "llamalit_adapter.json", "config.json", "adapter_config.json"):
            cfg = folder / cfg_name
            if cfg.is_file():
                try:
                    ref = json.loads(cfg.read_text()).get("tokenizer")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    ref = None
                if isinstance(ref, str) and ref:
                    candidate = Path(resolve_relative(ref, folder))
                    if candidate.is_file():
                        return candidate
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None
