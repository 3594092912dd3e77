"""Data preparation, end to end: source -> JSON files -> tokenizer -> shards -> ``manifest.json``.

:func:`prepare` is what ``llamalit-prepare`` and training call. :func:`read_manifest` is the one manifest
reader (it validates every field CONTRACT.md lists; the datasets use it), :func:`load_manifest` adds absolute
paths and checks the files against it. The manifest follows CONTRACT.md, plus a ``prepared_from`` record of
the settings, so a rerun with the same settings returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from llamalit.data.download import DownloadError, cached_download, extract_tar, is_url, sha256_file
from llamalit.data.pretokenize import (
    IGNORE_INDEX,
    LABEL_DTYPE,
    TOKEN_DTYPE,
    ShardJob,
    run_jobs,
)
from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import FORMATS, read_records, text_for_kind
from llamalit.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    check_vocab_fits,
    fetch_tokenizer,
    parse_train_spec,
    train_tokenizer,
    write_llama2c_tokenizer_bin,
)
from llamalit.fileio import atomic_path, atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llamalit-shards/1"
TOKENIZER_FILE = "tokenizer.model"
SYNTHETIC = "synthetic"
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_TOKEN_DTYPES = ("uint16", "uint32", "int32")  # what readers of the manifest accept
_LABEL_DTYPES = ("int32", "int64")
_ITEMSIZE = {"uint16": 2, "uint32": 4, "int32": 4, "int64": 8}

# Settings that decide the shards' content (compared with the manifest's prepared_from).
_KEYED = ("kind", "format", "source", "sha256", "tokenizer", "tokenizer_sha256", "seq_len", "val_shards",
          "train_on_inputs", "records_per_shard", "tokenizer_train_stories",
          "n_shards", "stories_per_shard", "seed")
_DEFAULTS = {"format": "tinystories", "sha256": None, "tokenizer_sha256": None, "seq_len": None,
             "val_shards": ["data00"], "train_on_inputs": False, "records_per_shard": 2000,
             "tokenizer_train_stories": 200_000, "num_workers": None,
             "n_shards": 5, "stories_per_shard": 2000, "seed": 0}


class ManifestError(ValueError):
    """Prepared data that cannot be used as it is; the message says what to do."""


class ManifestMissing(ManifestError, FileNotFoundError):
    """No ``manifest.json`` where the data should be (also a ``FileNotFoundError``)."""


@dataclass
class PrepareResult:
    manifest_path: Path
    stories: int
    tokens: int
    dropped: int
    seconds: float
    shards_done: int
    shards_skipped: int

    def summary(self) -> str:
        return (f"prepared {self.manifest_path}: {self.stories} stories, {self.tokens} tokens, "
                f"{self.dropped} dropped, {self.seconds:.1f} s "
                f"({self.shards_done} shards tokenized, {self.shards_skipped} reused)")


def data_settings(data_cfg: Mapping) -> dict:
    """``data_cfg`` (a dict or DictConfig) as a plain, validated dict with defaults filled in."""
    if hasattr(data_cfg, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    cfg = {**_DEFAULTS, **dict(data_cfg)}
    for key in ("kind", "source", "tokenizer", "dir"):
        if cfg.get(key) in (None, ""):
            raise ValueError(f"data.{key} is not set; every data config needs kind, source, tokenizer and dir")
    if cfg["kind"] not in ("pretrain", "instruct"):
        raise ValueError(f"data.kind={cfg['kind']!r}: use 'pretrain' or 'instruct'")
    if cfg["format"] not in FORMATS:
        raise ValueError(f"data.format={cfg['format']!r}: use one of {FORMATS}")
    if cfg["kind"] == "instruct" and not (isinstance(cfg["seq_len"], int) and cfg["seq_len"] > 1):
        raise ValueError(f"data.seq_len={cfg['seq_len']!r}: instruct rows need an integer length, e.g. 350")
    cfg["val_shards"] = list(cfg["val_shards"] or [])
    cfg["source"], cfg["tokenizer"], cfg["dir"] = str(cfg["source"]), str(cfg["tokenizer"]), str(cfg["dir"])
    return cfg


def check_data_dir(path: str | Path) -> Path:
    """``path`` (``data.dir``) expanded; raises ``NotADirectoryError`` when it, or a parent, is a file."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f"data.dir={path}: {p} is a file, not a directory; set data.dir to a "
                                         "directory for the shards (a new one, or one holding a manifest.json)")
            break
    return path


def stale_settings(manifest: Mapping, data_cfg: Mapping) -> list[str]:
    """``"key: recorded -> configured"`` for each setting that decides the shards' content and differs between
    the manifest's ``prepared_from`` and ``data_cfg``; empty when they agree or cannot be compared (a manifest
    without ``prepared_from``, a config without source/tokenizer)."""
    recorded = manifest.get("prepared_from")
    try:
        wanted = _prepared_from(data_settings(data_cfg))
    except (ValueError, TypeError, KeyError):
        return []
    if not isinstance(recorded, dict):
        return []
    return [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(wanted) | set(recorded))
            if recorded.get(k) != wanted.get(k)]


def _prepared_from(cfg: dict) -> dict:
    key = {k: cfg.get(k) for k in _KEYED}
    if key["kind"] == "pretrain":
        key["seq_len"] = None  # the window length is the reader's choice; shards do not depend on it
    if key["source"] != SYNTHETIC:
        for k in ("n_shards", "stories_per_shard", "seed"):
            key.pop(k)
    return key


def source_files(cfg: dict, cache_dir: Path) -> tuple[list[Path], bool]:
    """The local JSON/JSONL files of ``data.source`` (downloading, extracting or generating them).

    The flag is True for a single file whose records are to be cut into shards.
    """
    source = cfg["source"]
    if source == SYNTHETIC:
        out = cache_dir / "synthetic" / f"seed{cfg['seed']}-{cfg['n_shards']}x{cfg['stories_per_shard']}"
        files = [out / f"data{i:02d}.json" for i in range(cfg["n_shards"])]
        if not all(f.is_file() for f in files):
            files = make_corpus(out, cfg["n_shards"], cfg["stories_per_shard"], cfg["seed"])
        return files, False
    path = cached_download(source, cache_dir, sha256=cfg["sha256"]) if is_url(source) else Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.source={source!r}: no such file or directory; give a URL, a .tar.gz, "
                                f"a directory of data*.json, or a .json/.jsonl file")
    if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
        if cfg["sha256"] and not is_url(source) and (d := sha256_file(path)) != cfg["sha256"].lower():
            raise DownloadError(f"{path}: sha256 {d} differs from data.sha256={cfg['sha256']}")
        stem = path.name.split(".tar")[0].removesuffix(".tgz")
        path = extract_tar(path, cache_dir / "extracted" / f"{stem}-{path.stat().st_size}")
    if path.is_dir():
        files = sorted(path.glob("data*.json")) or sorted(path.rglob("data*.json"))
        if not files:
            raise FileNotFoundError(f"data.source={source!r}: no data*.json files in {path}")
        return files, False
    return [path], True


def _jobs(cfg: dict, files: list[Path], chunked: bool, out_dir: Path) -> list[ShardJob]:
    """One job per input shard (or per ``records_per_shard`` records of a single file); no tokenizer yet."""
    common = dict(out_dir=str(out_dir), tokenizer_path="", kind=cfg["kind"], format=cfg["format"],
                  seq_len=cfg["seq_len"] if cfg["kind"] == "instruct" else None,
                  train_on_inputs=bool(cfg["train_on_inputs"]))
    jobs = []
    if chunked:
        n, size = len(read_records(files[0])), int(cfg["records_per_shard"])  # one big file: cut it in chunks
        for i, start in enumerate(range(0, n, size)):
            name = f"data{i:02d}"
            jobs.append(ShardJob(name=name, source=str(files[0]), split=_split(name, cfg), start=start,
                                 stop=min(start + size, n), **common))
    else:
        for f in files:
            name = f.name.split(".")[0]
            jobs.append(ShardJob(name=name, source=str(f), split=_split(name, cfg), **common))
    if not any(j.split == "train" for j in jobs):
        raise ValueError(f"data.source={cfg['source']!r}: every shard ({[j.name for j in jobs]}) is in "
                         f"data.val_shards={cfg['val_shards']}; nothing is left to train on")
    return jobs


def _split(name: str, cfg: dict) -> str:
    return "val" if name in cfg["val_shards"] else "train"


def _training_texts(jobs: list[ShardJob], limit: int) -> Iterator[str]:
    """Texts to train a vocabulary on: train shards first, prompts too for instruct data."""
    count = 0
    for job in sorted(jobs, key=lambda j: j.split == "val"):
        records = read_records(job.source)
        start = job.start or 0
        chosen = records[start:job.stop] if job.start is not None else records
        for i, r in enumerate(chosen):
            prompt, text = text_for_kind(job.kind, job.format, r, Path(job.source), start + i)
            yield text if prompt is None else f"{prompt}\n{text}"
            count += 1
            if count >= limit:
                return


def _tokenizer_file(cfg: dict, cache_dir: Path, out_dir: Path, jobs: list[ShardJob]) -> Path:
    """``out_dir/tokenizer.model``: trained (train:N) or copied from the configured path/URL."""
    target = out_dir / TOKENIZER_FILE
    n = parse_train_spec(cfg["tokenizer"])
    if n is None:
        src = fetch_tokenizer(cfg["tokenizer"], cache_dir, cfg["tokenizer_sha256"])
        try:
            Tokenizer(src)  # a broken file is reported under its own name and never copied
        except TokenizerError as err:
            raise TokenizerError(f"data.tokenizer={cfg['tokenizer']!r}: {err}; give a SentencePiece .model "
                                 "file or URL, or train:N to train one") from err
        if not target.is_file() or sha256_file(target) != sha256_file(src):
            with atomic_path(target) as tmp:
                shutil.copyfile(src, tmp)
        return target
    key = {"tokenizer": cfg["tokenizer"], "limit": cfg["tokenizer_train_stories"],
           "inputs": [(j.label, Path(j.source).stat().st_size, j.split) for j in jobs]}
    meta = out_dir / "tokenizer.meta.json"
    try:
        if target.is_file() and json.loads(meta.read_text()) == {"key": key, "sha256": sha256_file(target)}:
            return target
    except (OSError, ValueError):
        pass
    train_tokenizer(_training_texts(jobs, int(cfg["tokenizer_train_stories"])), n, target)
    atomic_write_json(meta, {"key": key, "sha256": sha256_file(target)})
    return target


def _up_to_date(manifest_path: Path, cfg: dict) -> tuple[list[dict], int] | None:
    """(shards, stories) of a manifest made with these settings whose files are all intact, else None."""
    try:
        manifest = load_manifest(manifest_path)
        if manifest.get("prepared_from") != _prepared_from(cfg):
            return None
        metas = [json.loads(Path(s["tokens"]).with_suffix("").with_suffix(".meta.json").read_text())
                 for s in manifest["shards"]]
        return manifest["shards"], sum(m["stories"] for m in metas)
    except (ManifestError, OSError, ValueError, KeyError, TypeError):
        return None


def run_prepare(data_cfg: Mapping, cache_dir: str | Path, progress: bool = True) -> PrepareResult:
    """:func:`prepare`, returning counts and timing as well."""
    t0 = time.perf_counter()
    cfg = data_settings(data_cfg)
    cache_dir, out_dir = Path(cache_dir).expanduser(), check_data_dir(cfg["dir"])
    manifest_path = out_dir / MANIFEST
    if (done := _up_to_date(manifest_path, cfg)) is not None:
        shards, stories = done
        return PrepareResult(manifest_path, stories, sum(s["n_tokens"] for s in shards),
                             sum(s["dropped"] for s in shards), time.perf_counter() - t0, 0, len(shards))
    files, chunked = source_files(cfg, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(cfg, files, chunked, out_dir)
    # Nothing in out_dir changes while a manifest could vouch for it: a run stopped half way leaves no manifest
    # (readers then prepare again) and no shard meta that another run could mistake for its own.
    manifest_path.unlink(missing_ok=True)
    tok_path = _tokenizer_file(cfg, cache_dir, out_dir, jobs)
    tok = Tokenizer(tok_path)
    check_vocab_fits(tok.vocab_size, TOKEN_DTYPE, source=str(tok_path))
    write_llama2c_tokenizer_bin(tok_path, out_dir / "tokenizer.bin")
    jobs = [replace(j, tokenizer_path=str(tok_path), tokenizer_sha256=tok.sha256) for j in jobs]
    workers = cfg["num_workers"] or os.cpu_count() or 1
    results = run_jobs(jobs, int(workers), progress=progress)
    manifest = {
        "format": MANIFEST_FORMAT, "kind": cfg["kind"],
        "seq_len": cfg["seq_len"] if cfg["kind"] == "instruct" else None,
        "ignore_index": IGNORE_INDEX, "pad_id": tok.eos_id,
        "tokenizer": {"path": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "shards": [r["entry"] for r in results],
        "prepared_from": _prepared_from(cfg),
    }
    atomic_write_json(manifest_path, manifest)  # last, and atomically: a manifest means every file is done
    return PrepareResult(manifest_path, sum(r["stories"] for r in results),
                         sum(r["entry"]["n_tokens"] for r in results),
                         sum(r["entry"]["dropped"] for r in results), time.perf_counter() - t0,
                         sum(not r["skipped"] for r in results), sum(r["skipped"] for r in results))


def prepare(data_cfg: Mapping, cache_dir: str | Path) -> Path:
    """Make sure ``data_cfg.dir`` holds shards for ``data_cfg`` and return its ``manifest.json`` path.

    Returns at once when the manifest matches the settings and every shard exists; otherwise
    downloads / generates the source, gets the tokenizer and pretokenizes (skipping shards done
    before with the same settings).
    """
    return run_prepare(data_cfg, cache_dir).manifest_path


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


__all__ = ["prepare", "run_prepare", "read_manifest", "load_manifest", "manifest_path", "verify_tokenizer",
           "check_tokenizer", "check_data_dir", "stale_settings", "data_settings", "PrepareResult", "ManifestError",
           "ManifestMissing", "MANIFEST", "MANIFEST_FORMAT",
           "LABEL_DTYPE", "TOKEN_DTYPE"]
