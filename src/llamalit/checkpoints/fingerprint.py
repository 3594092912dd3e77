"""What an adapter was trained on: sha256 of its base checkpoint's weight files and of the base's tokenizer.

An adapter records them when it is saved; loading it onto a base whose files hash differently (the
base directory was retrained or replaced since) is refused, naming both, instead of silently scoring
worse. Files in a Hugging Face Hub cache are not read again: an LFS blob there is named by its sha256.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llamalit.checkpoints.common import CheckpointError
from llamalit.checkpoints.tokenizer import find_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content (a Hub-cache LFS blob's own name, which is that sha256)."""
    path = Path(path)
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256.fullmatch(target.name):
        return target.name
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(ckpt: str | Path) -> str:
    """sha256 of a checkpoint's weights: the file itself, or for a directory its weight files (by name)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return file_sha256(ckpt)
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise CheckpointError(f"{ckpt}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def base_fingerprint(base_local: Path) -> dict:
    """The record an adapter keeps of its base (at ``base_local``): weights and tokenizer sha256."""
    tok = find_tokenizer(base_local) if base_local.is_dir() else None
    return {"base_sha256": weights_sha256(base_local),
            "base_tokenizer_sha256": file_sha256(tok) if tok is not None else None}


def check_base(adapter: Path, meta: dict, base_ref: str, base_local: Path) -> None:
    """Refuse a base whose weights or tokenizer differ from those the adapter recorded (older adapters
    recorded none and are not checked)."""
    want = meta.get("base_sha256")
    if want:
        have = weights_sha256(base_local)
        if have != want:
            raise CheckpointError(
                f"{adapter}: this adapter was trained on base {base_ref} with weights sha256 {want[:16]}, but "
                f"{base_local} now holds weights sha256 {have[:16]} (retrained or replaced since?); load it onto "
                "the base it was trained on, or train the adapter again on this one")
    want_tok = meta.get("base_tokenizer_sha256")
    if want_tok:
        tok = find_tokenizer(base_local) if base_local.is_dir() else None
        have_tok = file_sha256(tok) if tok is not None else None
        if have_tok is not None and have_tok != want_tok:
            raise CheckpointError(
                f"{adapter}: this adapter was trained with base {base_ref}'s tokenizer sha256 {want_tok[:16]}, "
                f"but that base's tokenizer {tok} is now sha256 {have_tok[:16]}; load it onto the base it was "
                "trained on, or train the adapter again on this one")
