"""The ``manifest.json`` of prepared data (CONTRACT.md "Prepared data"): read, validated, checked against files.

:func:`read_manifest` is the one manifest reader (it validates every field CONTRACT.md lists; the datasets
use it); :func:`load_manifest` adds absolute paths and checks the shard files and the tokenizer against it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from llamalit.data.download import sha256_file
from llamalit.data.pretokenize import IGNORE_INDEX, LABEL_DTYPE, TOKEN_DTYPE
from llamalit.data.tokenizer import Tokenizer, TokenizerError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llamalit-shards/1"
_TOKEN_DTYPES = ("uint16", "uint32", "int32")  # what readers of the manifest accept
_LABEL_DTYPES = ("int32", "int64")
_ITEMSIZE = {"uint16": 2, "uint32": 4, "int32": 4, "int64": 8}


class ManifestError(ValueError):
    """Prepared data that cannot be used as it is; the message says what to do."""


class ManifestMissing(ManifestError, FileNotFoundError):
    """No ``manifest.json`` where the data should be (also a ``FileNotFoundError``)."""


def manifest_path(path_or_dir: str | Path) -> Path:
    """``manifest.json`` inside ``path_or_dir`` when that is a directory (or not a ``.json``), else itself."""
    path = Path(path_or_dir).expanduser()
    return path / MANIFEST if path.is_dir() or path.suffix != ".json" else path


def _rerun(path: Path, fix: str = "fix it, or ") -> str:
    return (f"{fix}prepare again: `python scripts/prepare.py data=NAME data.dir={path.parent}` "
            f"(llamalit-prepare), or delete {path.parent} and training prepares it")


def read_manifest(path_or_dir: str | Path) -> dict:
    """Load and validate ``manifest.json`` (CONTRACT.md layout), paths as written (relative to its directory).

    Raises :class:`ManifestMissing` (a ``FileNotFoundError``) when there is none and :class:`ManifestError`
    (a ``ValueError``) naming the file and the field when it is unreadable or malformed.
    """
    path = manifest_path(path_or_dir)
    if not path.is_file():
        raise ManifestMissing(f"{path} does not exist: no manifest; run `llamalit-prepare data=NAME "
                              f"data.dir={path.parent}` (training runs the same preparation when it is missing).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: unreadable manifest, not valid JSON ({err}); {_rerun(path)}.") \
            from err
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(manifest).__name__}; {_rerun(path)}.")
    _require(path, manifest, "format", str)
    if manifest["format"] != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format is {manifest['format']!r}, this reader understands "
                            f"{MANIFEST_FORMAT!r}; {_rerun(path)}.")
    _require(path, manifest, "kind", str)
    if manifest["kind"] not in ("pretrain", "instruct"):
        raise ManifestError(f"{path}: kind is {manifest['kind']!r}; expected 'pretrain' or 'instruct'.")
    instruct = manifest["kind"] == "instruct"
    if instruct and _require(path, manifest, "seq_len", int) < 2:
        raise ManifestError(f"{path}: seq_len {manifest['seq_len']} is too short for an instruct row (>= 2).")
    manifest.setdefault("seq_len", None)
    _require(path, manifest, "pad_id", int)
    _require(path, _require(path, manifest, "tokenizer", dict), "vocab_size", int, where="tokenizer")
    ignore = manifest.setdefault("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore, int) or isinstance(ignore, bool):
        raise ManifestError(f"{path}: field 'ignore_index' should be int, found {ignore!r}.")
    for i, shard in enumerate(_require(path, manifest, "shards", list)):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise ManifestError(f"{path}: {where} is not an object.")
        _require(path, shard, "split", str, where=where)
        _require(path, shard, "tokens", str, where=where)
        if shard.setdefault("token_dtype", TOKEN_DTYPE) not in _TOKEN_DTYPES:
            raise ManifestError(f"{path}: {where}.token_dtype {shard['token_dtype']!r} not one of {_TOKEN_DTYPES}.")
        if instruct:
            _require(path, shard, "labels", str, where=where)
            _require(path, shard, "rows", int, where=where)
            if shard.setdefault("label_dtype", LABEL_DTYPE) not in _LABEL_DTYPES:
                raise ManifestError(f"{path}: {where}.label_dtype {shard['label_dtype']!r} not one of "
                                    f"{_LABEL_DTYPES}.")
        else:
            _require(path, shard, "n_tokens", int, where=where)
    return manifest


def _require(path: Path, obj: dict, key: str, kind: type, where: str = ""):
    label = f"{where}.{key}" if where else key
    if key not in obj:
        raise ManifestError(f"{path}: missing field {label!r}; the manifest is malformed, {_rerun(path)}.")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{path}: field {label!r} should be {kind.__name__}, found {value!r}.")
    return value


def load_manifest(path_or_dir: str | Path, verify: bool = True) -> dict:
    """:func:`read_manifest` with absolute paths (and ``dir``, the manifest's directory).

    With ``verify``, every shard file must exist with the size the manifest implies and the tokenizer file
    must have the recorded sha256; otherwise :class:`ManifestError` says what to do.
    """
    manifest = read_manifest(path_or_dir)
    path = manifest_path(path_or_dir)
    root = path.parent
    manifest["dir"] = str(root)
    tok = manifest["tokenizer"]
    tok["path"] = str(root / tok["path"]) if tok.get("path") else None
    instruct = manifest["kind"] == "instruct"
    for shard in manifest["shards"]:
        elements = shard["rows"] * manifest["seq_len"] if instruct else shard["n_tokens"]
        for key, dtype_key in (("tokens", "token_dtype"), ("labels", "label_dtype")):
            if shard.get(key) is None:
                continue
            shard[key] = str(root / shard[key])
            expected = elements * _ITEMSIZE[shard[dtype_key]]
            if verify and (not Path(shard[key]).is_file() or Path(shard[key]).stat().st_size != expected):
                raise ManifestError(f"{shard[key]}: missing or not {expected} bytes as the manifest says; "
                                    f"{_rerun(path)}")
    if verify:
        check_tokenizer(manifest, path)
    return manifest


def check_tokenizer(manifest: Mapping, manifest_file: str | Path) -> Path:
    """The tokenizer file ``manifest`` names (relative to ``manifest_file``'s directory), checked against the
    manifest's record: its sha256, then (loaded with SentencePiece) its piece count and BOS/EOS ids.

    Raises :class:`ManifestError` naming both files when the file is missing or disagrees with the record.
    """
    where, record = Path(manifest_file), manifest["tokenizer"]
    if not record.get("path"):
        raise ManifestError(f"{where}: tokenizer.path is not set, so the shards' tokenizer is unknown; "
                            f"{_rerun(where)}")
    path = where.parent / Path(record["path"]).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: the tokenizer of the shards in {where} is missing; "
                            f"{_rerun(where, 'put it back, or ')}")
    if record.get("sha256") is not None and (digest := sha256_file(path)) != record["sha256"]:
        raise ManifestError(f"{path}: sha256 {digest} differs from the manifest's {record['sha256']} ({where}): "
                            "the shards were made with another tokenizer. "
                            f"{_rerun(where, 'Put the original back, or ')}")
    try:
        tok = Tokenizer(path)
    except TokenizerError as err:
        raise ManifestError(f"{err}; it is the tokenizer of {where}: {_rerun(where)}") from err
    for key, have in (("vocab_size", tok.vocab_size), ("bos_id", tok.bos_id), ("eos_id", tok.eos_id)):
        if key in record and record[key] != have:
            raise ManifestError(f"{where}: tokenizer.{key} is {record[key]!r} but the tokenizer {path} has "
                                f"{have}; {_rerun(where)}")
    return path


def verify_tokenizer(manifest: Mapping, tokenizer: Tokenizer | str | Path) -> None:
    """Raise when ``tokenizer`` is not the one the shards of ``manifest`` were made with."""
    path = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    digest = sha256_file(path)
    if digest != manifest["tokenizer"]["sha256"]:
        raise TokenizerError(f"{path}: sha256 {digest} differs from {manifest['tokenizer']['sha256']} recorded in "
                             f"{manifest.get('dir', 'the manifest')}; use the tokenizer stored with the shards "
                             f"({manifest['tokenizer']['path']}) or prepare the data again with this one")
