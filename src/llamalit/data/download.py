"""Downloads into a cache (progress bar, HTTP Range resume, size and sha256 checks) and safe tar extraction."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from llamalit.utils.hub import hub_dataset_file, is_url, parse_hub_id  # noqa: F401 - is_url: callers import it from here

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or archive that cannot be used; the message says which and what to do."""


def default_cache_dir() -> Path:
    """``$LLAMALIT_CACHE`` or ``~/.cache/llamalit``."""
    return Path(os.environ.get("LLAMALIT_CACHE", "~/.cache/llamalit")).expanduser()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, url: str, size: int | None, sha256: str | None) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; the download was cut short or the "
                            f"file changed upstream. Run again to resume, or check the URL.")
    if sha256 is not None and (digest := sha256_file(path)) != sha256.lower():
        raise DownloadError(f"{url}: sha256 {digest} does not match the expected {sha256}; the file was "
                            f"deleted. Check the URL and the configured sha256, then run again.")


def download(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to the file ``dest`` and return it.

    Streams into ``dest.part`` and resumes it with an HTTP Range request if a previous run was
    interrupted; the size (given, or announced by the server) and ``sha256`` (when known) are
    checked before ``dest.part`` is renamed to ``dest``. An existing ``dest`` that passes the
    checks is returned without network access.
    """
    dest = Path(dest)
    if dest.is_file():
        return _verified(dest, url, size, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "llamalit"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already complete (or bigger than the file)
            part.replace(dest)
            return _verified(dest, url, size, sha256)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the URL (data.source / data.tokenizer)") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot connect ({e}); check the URL and your network, "
                            f"or point the setting at a local copy") from e
    with response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # the server ignored the Range header: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if size is None and total is not None and urlparse(url).scheme != "file":
            size = total
        mode = "ab" if have else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         desc=dest.name, disable=not progress, leave=False) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, ValueError) as e:  # connection reset, IncompleteRead: keep .part for resume
                raise DownloadError(f"{url}: interrupted after {f.tell()} bytes ({e}); "
                                    f"run again to resume from {part}") from e
    if size is not None and part.stat().st_size < size:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {size} bytes; run again to resume from {part}")
    part.replace(dest)
    return _verified(dest, url, size, sha256)


def _verified(dest: Path, url: str, size: int | None, sha256: str | None) -> Path:
    try:
        _check(dest, url, size, sha256)
    except DownloadError:
        dest.unlink(missing_ok=True)
        raise
    return dest


def cached_download(url: str, cache_dir: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` into ``cache_dir/downloads/<file name>`` (see :func:`download`)."""
    name = Path(unquote(urlparse(url).path)).name or "download"
    return download(url, Path(cache_dir) / "downloads" / name, sha256=sha256, progress=progress)


# What data.source=org/name fetches of a Hub dataset when the data config names no hub_files
DATA_FILES = ("*.json", "*.jsonl", "*.parquet", "*.tar.gz")


def source_path(cfg: dict, cache_dir: str | Path) -> Path:
    """The local file or directory of ``data.source``: a URL downloaded into ``cache_dir``, a Hugging Face
    Hub dataset id (``org/name[@revision]``; ``hub`` for the config's ``hub_id``) from the Hub cache, the
    files ``hub_files`` names, or a local path (which wins over a Hub id of the same name)."""
    source = str(cfg["source"])
    if is_url(source):
        return cached_download(source, cache_dir, sha256=cfg.get("sha256"))
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source == "hub":
        if not cfg.get("hub_id"):
            raise ValueError("data.source=hub: this data config has no hub_id; give data.source=org/name")
        source = str(cfg["hub_id"])
    ref = parse_hub_id(source)
    if ref is None:
        return path
    return hub_dataset_file(ref, "data.source", list(cfg.get("hub_files") or DATA_FILES))


def _reject_unsafe(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if member.issym() or member.islnk():
        raise DownloadError(f"{archive}: refusing link {name!r} -> {member.linkname!r}; the archive is not a "
                            f"plain data archive. Get it from a trusted source.")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"{archive}: refusing special file {name!r} (device, FIFO or similar)")
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
        raise DownloadError(f"{archive}: refusing member {name!r} that would land outside the target directory")


def extract_tar(archive: str | Path, out_dir: str | Path, downloaded: bool = True) -> Path:
    """Extract a (compressed) tar archive into ``out_dir`` safely and atomically; return ``out_dir``.

    Links, devices, absolute paths and ``..`` are refused before anything is written; Python's
    ``data`` extraction filter is applied as a second guard. The archive is unpacked into a temp
    directory that is renamed to ``out_dir`` only when complete. ``downloaded``: the archive is a cached
    download (the error says to fetch it again), else the user's own file (the error says to fix it).
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.is_dir():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _reject_unsafe(member, archive)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        tmp.rename(out_dir)
    except (tarfile.TarError, EOFError, OSError) as e:
        why = " ".join(str(e).split())  # tarfile lists every compression it tried, one a line
        if not downloaded:
            raise DownloadError(f"{archive}: not a readable tar archive ({why}); data.source must be a .tar.gz of "
                                "data*.json, a directory of them, or a .json/.jsonl file") from e
        raise DownloadError(f"{archive}: the downloaded archive cannot be extracted ({why}); delete it and run "
                            "again to download it anew") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
