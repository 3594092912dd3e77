"""Atomic file writes: a temp file in the target directory, then a rename, so nothing is half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and writers that recreate it) make 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_tagged_json(path: str | Path, fmt: str, required: str, what: str) -> dict:
    """A JSON file whose ``format`` must be ``fmt`` and that must hold ``required``; clear errors otherwise."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing; is {path.parent} a {what} directory?") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt or required not in meta:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: not a {what} config (format {found!r}, expected {fmt!r})")
    return meta
