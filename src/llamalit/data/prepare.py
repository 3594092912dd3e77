"""Data preparation, end to end: source -> JSON files -> tokenizer -> shards -> ``manifest.json``.

:func:`prepare` is what ``llamalit-prepare`` and training call. The manifest (read and checked in
:mod:`llamalit.data.manifest`) follows CONTRACT.md, plus a ``prepared_from`` record of the settings, so a
rerun with the same settings returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from llamalit.data.download import DownloadError, extract_tar, is_url, sha256_file, source_path
from llamalit.data.manifest import (  # re-exported: prepare is where callers have imported them from
    MANIFEST,
    MANIFEST_FORMAT,
    ManifestError,
    ManifestMissing,
    check_tokenizer,
    load_manifest,
    manifest_path,
    read_manifest,
    verify_tokenizer,
)
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
from llamalit.utils.fileio import atomic_path, atomic_write_json

TOKENIZER_FILE = "tokenizer.model"
SYNTHETIC = "synthetic"
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")

# Settings that decide the shards' content (compared with the manifest's prepared_from).
_KEYED = ("kind", "format", "source", "sha256", "tokenizer", "tokenizer_sha256", "seq_len", "val_shards",
          "train_on_inputs", "records_per_shard", "val_size", "tokenizer_train_stories",
          "n_shards", "stories_per_shard", "seed")
_DEFAULTS = {"format": "tinystories", "sha256": None, "tokenizer_sha256": None, "seq_len": None,
             "val_shards": ["data00"], "train_on_inputs": False, "records_per_shard": 2000, "val_size": 0.1,
             "tokenizer_train_stories": 200_000, "num_workers": None,
             "n_shards": 5, "stories_per_shard": 2000, "seed": 0}


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
    path = source_path(cfg, cache_dir)  # a URL, a Hugging Face Hub dataset id or a local path
    if not path.exists():
        raise FileNotFoundError(f"data.source={source!r}: no such file or directory; give a URL, a .tar.gz, "
                                f"a directory of data*.json, or a .json/.jsonl file")
    if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
        if cfg["sha256"] and not is_url(source) and (d := sha256_file(path)) != cfg["sha256"].lower():
            raise DownloadError(f"{path}: sha256 {d} differs from data.sha256={cfg['sha256']}")
        stem = path.name.split(".tar")[0].removesuffix(".tgz")
        path = extract_tar(path, cache_dir / "extracted" / f"{stem}-{path.stat().st_size}", downloaded=is_url(source))
    if path.is_dir():
        files = sorted(path.glob("data*.json")) or sorted(path.rglob("data*.json"))
        if not files:
            raise FileNotFoundError(f"data.source={source!r}: no data*.json files in {path}")
        return files, False
    return [path], True


def _jobs(cfg: dict, files: list[Path], chunked: bool, out_dir: Path) -> list[ShardJob]:
    """One job per input shard (or per ``records_per_shard`` records of a single file); no tokenizer yet.

    A single file whose chunks would all be validation shards (fewer records than ``records_per_shard``) is
    split by records instead: its first :func:`val_records` records validate (``data00``), the rest train
    (``data01``), as alpaca-lora's ``val_set_size`` does."""
    common = dict(out_dir=str(out_dir), tokenizer_path="", kind=cfg["kind"], format=cfg["format"],
                  seq_len=cfg["seq_len"] if cfg["kind"] == "instruct" else None,
                  train_on_inputs=bool(cfg["train_on_inputs"]))
    jobs = []
    if chunked:
        n, size = check_records(cfg, files[0]), int(cfg["records_per_shard"])  # one big file: cut it in chunks
        names = [f"data{i:02d}" for i in range(-(-n // size))]
        if all(_split(name, cfg) == "val" for name in names):
            k = val_records(n, cfg["val_size"], files[0])
            return [ShardJob(name="data00", source=str(files[0]), split="val", start=0, stop=k, **common),
                    ShardJob(name="data01", source=str(files[0]), split="train", start=k, stop=n, **common)]
        for i, start in enumerate(range(0, n, size)):
            jobs.append(ShardJob(name=names[i], source=str(files[0]), split=_split(names[i], cfg), start=start,
                                 stop=min(start + size, n), **common))
    else:
        for f in files:
            name = f.name.split(".")[0]
            jobs.append(ShardJob(name=name, source=str(f), split=_split(name, cfg), **common))
    if not any(j.split == "train" for j in jobs):
        raise ValueError(f"data.source={cfg['source']!r}: every shard ({[j.name for j in jobs]}) is in "
                         f"data.val_shards={cfg['val_shards']}; nothing is left to train on: list fewer shards "
                         "in data.val_shards")
    return jobs


def record_split(cfg: dict, jobs: list[ShardJob]) -> dict | None:
    """The manifest's ``split`` record when :func:`_jobs` split a small file by records, else None."""
    val, train = jobs[0], jobs[-1]
    if len(jobs) != 2 or val.split != "val" or val.stop >= int(cfg["records_per_shard"]):
        return None
    return {"by": "records", "val_size": cfg["val_size"], "records": train.stop, "val_records": val.stop,
            "train_records": train.stop - train.start, "val": f"records [0:{val.stop}] of {Path(val.source).name}"}


def val_records(n: int, val_size: float | int, source: Path) -> int:
    """How many of a small file's ``n`` records validate: ``val_size`` records (an integer >= 1) or that
    fraction of ``n`` (a number in (0, 1)), at least 1, and at least one record left to train on."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size <= 0 \
            or (isinstance(val_size, float) and val_size >= 1 and not val_size.is_integer()):
        raise ValueError(f"data.val_size={val_size!r}: give a fraction in (0, 1) or a record count >= 1")
    k = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if n < 2:
        raise ValueError(f"{source}: {n} record; training and validation need at least 2 records "
                         "(one of each); add records to the file")
    if k >= n:
        raise ValueError(f"data.val_size={val_size!r}: {k} validation records of the {n} in {source} leave none "
                         f"to train on; use a smaller count (at most {n - 1}) or a fraction")
    return k


def check_records(cfg: dict, source: Path) -> int:
    """The record count of ``source``; raises, naming the count and the fields found, when the file has no
    record that ``data.format`` can read."""
    records = read_records(source)
    if not records:
        raise ValueError(f"data.source={source}: the file holds 0 records (an empty list/file); give a "
                         f".json array or .jsonl file of {cfg['format']} records")
    errors = []
    for i, record in enumerate(records):
        try:
            text_for_kind(cfg["kind"], cfg["format"], record, source, i)
            return len(records)
        except ValueError as e:
            errors.append(e)
    fields = sorted({k for r in records[:100] if isinstance(r, dict) for k in r})
    raise ValueError(f"data.source={source}: none of its {len(records)} records is a usable "
                     f"data.format={cfg['format']} record for data.kind={cfg['kind']} (fields found: {fields}; "
                     f"first problem: {errors[0]}); set data.format to the file's format (one of {FORMATS})")


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
    if chunked and (split := record_split(cfg, jobs)) is not None:
        manifest["split"] = split
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


__all__ = ["prepare", "run_prepare", "read_manifest", "load_manifest", "manifest_path", "verify_tokenizer",
           "check_tokenizer", "check_data_dir", "stale_settings", "data_settings", "PrepareResult", "ManifestError",
           "ManifestMissing", "MANIFEST", "MANIFEST_FORMAT",
           "LABEL_DTYPE", "TOKEN_DTYPE"]
