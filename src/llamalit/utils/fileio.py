"""Atomic writes: a temp file (or directory) beside the target, then a rename, so nothing is half-written."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# how writers that do not raise OSError report one (torch's zip writer, safetensors' Rust io::Error)
_FULL_TEXTS = ("File too large", "No space left", "Disk quota", "FileTooLarge", "StorageFull", "unexpected pos")


class DiskFullError(OSError):
    """A write stopped by a full disk or a file size limit (``ulimit -f``); the message names the file."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a write that ran out of room."""
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS or any(t in str(seen) for t in _FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(target: Path, e: BaseException) -> DiskFullError:
    """One line for a write to ``target`` that ran out of room: the file, why, and that the old one stands."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return DiskFullError(f"{target}: not written, the disk is full or a file size limit (ulimit -f) was hit "
                         f"({reason}); an earlier {target.name} there is untouched (the bytes went to a temp file, "
                         "now removed)")


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, DiskFullError) and isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``path`` (``.<name>.tmp-*``, same filesystem); on success it
    replaces ``path`` as a whole (an existing ``path`` is renamed aside, the new one renamed in, the old
    one deleted), on error it is removed and ``path`` is untouched."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory; choose a directory path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        if not path.exists():
            os.replace(tmp, path)
            return
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / path.name, path)  # put the old one back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        being_written = _newest(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise _in_target(e, tmp, path, being_written) from e
        raise


def _in_target(e: Exception, tmp: Path, path: Path, being_written: str | None) -> DiskFullError:
    """The full-disk error of a write into staging directory ``tmp``, naming the file under ``path`` instead."""
    if isinstance(e, DiskFullError):  # raised by an atomic_path inside tmp: it names the temp path
        return DiskFullError(str(e).replace(str(tmp), str(path)))
    return disk_full_error(path / being_written if being_written else path, e)


def _newest(folder: Path) -> str | None:
    """The name of the file modified last under ``folder`` (the one a failed write was writing), relative."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
        return str(max(files, key=lambda p: p.stat().st_mtime_ns).relative_to(folder)) if files else None
    except OSError:
        return None


def _owned(name: str, owned: Collection[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in owned)


def _replaceable(path: Path, owned: Collection[str]) -> bool:
    """Whole-directory replacement is safe: ``path`` is absent, or a plain directory (not the working
    directory or above it) holding only names the writer owns."""
    if not path.exists():
        return True
    cwd = Path.cwd()
    if path.is_symlink() or path == cwd or path in cwd.parents:
        return False
    return path.is_dir() and all(_owned(p.name, owned) for p in path.iterdir())


@contextmanager
def atomic_checkpoint_dir(path: str | Path, owned: Collection[str], commit: str) -> Iterator[Path]:
    """Yield a temp directory to write a multi-file checkpoint into; on success it is published at ``path``.

    ``owned``: the names (fnmatch patterns) this kind of checkpoint may hold; ``commit``: the file
    whose presence makes the directory loadable (its config). Where ``path`` is absent or holds only
    owned names, the whole directory is replaced (:func:`atomic_dir`): an error or interruption
    leaves the old one intact. Where it also holds other files (a run directory, a ``base/``
    beside an adapter), those are kept: ``commit`` is removed first, stale owned files deleted,
    the new files renamed in, ``commit`` last, so an interruption leaves no ``commit`` (the
    directory fails to load, loudly) rather than a mix of two models. An error raised while
    writing leaves ``path`` untouched either way.
    """
    path = Path(os.path.abspath(path))
    if _replaceable(path, owned):
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory; choose a directory path")
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".llamalit-staging-"))
    try:
        yield tmp
        new = sorted(p.name for p in tmp.iterdir())
        (path / commit).unlink(missing_ok=True)
        for stale in path.iterdir():
            if stale.name not in new and stale != tmp and _owned(stale.name, owned):
                _remove(stale)
        for name in new:
            if name != commit:
                os.replace(tmp / name, path / name)
        if commit in new:
            os.replace(tmp / commit, path / commit)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise _in_target(e, tmp, path, _newest(tmp)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
