"""Hugging Face Hub ids for checkpoints (``init_from=``, ``ckpt=``) and datasets (``data.source=``).

The rule (README): a URL is a URL; a path that exists locally wins; otherwise ``org/name`` (one
slash, not starting with ``.``, ``/`` or ``~``) is a Hub repository, ``org/name/dir/file.pt`` one file
of it, and ``@revision`` after either picks a branch, tag or commit (default ``main``). Files come
through ``huggingface_hub``: only the files needed (``allow_patterns``), into its cache
(``HF_HUB_CACHE``), with ``HF_TOKEN`` for gated or private repositories; ``HF_HUB_OFFLINE=1`` uses
only what is cached.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# Of a model repository: config, safetensors weights (or an adapter's), tokenizer; torch .bin weights only
# when a repository has no safetensors.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model")
MODEL_FALLBACK_FILES = ("pytorch_model*.bin",)

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^@/]+)*)(?:@(?P<revision>[A-Za-z0-9_./-]+))?")


def is_url(text: str | Path) -> bool:
    """Whether ``text`` is an http(s) or file URL (not a path, not a Hub id)."""
    return urlparse(str(text)).scheme in ("http", "https", "file")


class HubError(OSError):
    """A Hub id that cannot be resolved; the message names the id, the setting and what to do."""


@dataclass(frozen=True)
class HubRef:
    """``repo_id`` (``org/name``), an optional file inside it and an optional revision."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.filename}" if self.filename else "") + \
            (f"@{self.revision}" if self.revision else "")


def parse_hub_id(ref: str | Path | None) -> HubRef | None:
    """The Hub reference ``ref`` names, or None for a URL, a local path or anything else (see the module)."""
    if ref is None:
        return None
    text = str(ref)
    if not text or is_url(text) or text.startswith(("/", ".", "~", "\\")) or Path(text).expanduser().exists():
        return None
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in text.split("/"):
        return None
    return HubRef(match["repo"], match["file"].lstrip("/") or None, match["revision"])


def require_checkpoint(ref: str | Path) -> None:
    """FileNotFoundError naming ``ref`` when it is neither a URL, an existing path nor a Hub id: the check every
    command makes before importing torch, so a mistyped path is reported at once."""
    if is_url(str(ref)) or Path(ref).expanduser().exists() or parse_hub_id(str(ref)) is not None:
        return
    raise FileNotFoundError(f"checkpoint {Path(ref).expanduser()}: no such file or directory")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                               "TRUE")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None  # None: huggingface_hub's own default


def hub_download(ref: HubRef, key: str, repo_type: str = "model",
                 allow_patterns: Sequence[str] = MODEL_FILES, ignore_patterns: Sequence[str] = ()) -> Path:
    """The local path of ``ref``: its one file, or a snapshot folder of the files matching ``allow_patterns``."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    common = {"repo_type": repo_type, "revision": ref.revision, "cache_dir": _cache_dir(),
              "local_files_only": _offline()}
    what = f"{key}={ref}"
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        if ref.filename:
            return Path(hf_hub_download(ref.repo_id, ref.filename, **common))
        return Path(snapshot_download(ref.repo_id, allow_patterns=list(allow_patterns),
                                      ignore_patterns=list(ignore_patterns) or None, **common))
    except GatedRepoError as e:
        raise HubError(f"{what}: the Hugging Face {kind} {ref.repo_id} is gated; accept its terms on the Hub and "
                       "set HF_TOKEN (or run `hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{what}: no Hugging Face {kind} repository {ref.repo_id} (or it is private: set HF_TOKEN), "
                       f"and no local path of that name either") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: the {kind} {ref.repo_id} has no revision {ref.revision!r}") from e
    except LocalEntryNotFoundError as e:
        where = _cache_dir() or "huggingface_hub's cache (HF_HUB_CACHE)"
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise HubError(f"{what}: not in {where}, and {reason}; no local path of that name either. Download it "
                       f"once online (unset HF_HUB_OFFLINE), or give a local path") from e
    except EntryNotFoundError as e:
        raise HubError(f"{what}: the {kind} {ref.repo_id} has no file {ref.filename!r}") from e
    except HfHubHTTPError as e:
        raise HubError(f"{what}: Hugging Face Hub request failed ({str(e).splitlines()[0]})") from e


def hub_checkpoint(ref: HubRef, key: str) -> Path:
    """A model repository's checkpoint files (safetensors, else torch ``.bin`` weights) in the Hub cache."""
    path = hub_download(ref, key, ignore_patterns=("pytorch_model*",))  # not a .bin index beside safetensors
    if path.is_dir() and not any(path.glob("*.safetensors")):
        path = hub_download(ref, key, allow_patterns=(*MODEL_FILES, *MODEL_FALLBACK_FILES))
        if not any(path.glob("*.bin")):
            raise HubError(f"{key}={ref}: the snapshot {path} holds no weights (*.safetensors or "
                           "pytorch_model*.bin); name one file of the repository: org/name/FILE")
    return path


def hub_dataset_file(ref: HubRef, key: str, patterns: Sequence[str]) -> Path:
    """The data of a Hub dataset: its one file matching ``patterns``, or its folder of ``data*.json`` shards."""
    path = hub_download(ref, key, repo_type="dataset", allow_patterns=patterns)
    if path.is_file():
        return path
    # the snapshot folder may hold more files cached before: keep those the patterns match, as the download did
    files = sorted(p for p in path.rglob("*") if p.is_file() and
                   any(fnmatch.fnmatch(p.relative_to(path).as_posix(), pattern) for pattern in patterns))
    if len(files) == 1:
        return files[0]
    if files and all(re.fullmatch(r"data\d*\.json", p.name) for p in files):
        return path
    listing = [str(p.relative_to(path)) for p in files][:8]
    raise HubError(f"{key}={ref}: data.hub_files={list(patterns)} match {len(files)} files ({listing}); "
                   "narrow data.hub_files to one file (or name it: data.source=org/name/FILE)")
