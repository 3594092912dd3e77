"""Settings checked before any work starts: paths expanded (``~``, ``$VAR``), every number in range, required keys.

Each failure is one ``ValueError`` naming the key, the value and what is valid, which the command-line entry
points print as one ``error:`` line (:func:`llamalit.cli.user_errors`). The checks read plain dicts and
``DictConfig`` alike, by dotted key; a key that is absent is not checked (another config may not have it).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from llamalit.utils.hub import is_url

_ABSENT = object()
MISSING = "???"  # what OmegaConf.to_container leaves for a mandatory key nobody set

# Keys of a training config that hold paths; the cache keys first, as the others may interpolate them.
DATA_PATH_KEYS = ("paths.cache_dir", "paths.data_root", "paths.models_dir", "data.dir", "data.source",
                  "data.tokenizer")
TRAIN_PATH_KEYS = (*DATA_PATH_KEYS, "init_from", "ckpt_path", "export_dir", "run_dir")


def expand_path(value: str) -> str:
    """``value`` with ``$VAR``/``${VAR}`` and a leading ``~`` expanded; URLs and ``train:N`` specs unchanged."""
    if is_url(value) or value.startswith("train:"):
        return value
    return os.path.expanduser(os.path.expandvars(value))


def get(cfg: Mapping, key: str, default: Any = _ABSENT) -> Any:
    """The value at dotted ``key`` (interpolations resolved), or ``default`` when a part of it is absent."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            return MISSING
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _set(cfg: Mapping, key: str, value: Any) -> None:
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
        return
    *parents, last = key.split(".")
    node: Any = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def expand_paths(cfg: Mapping, keys: Iterable[str]) -> None:
    """Expand ``~`` and environment variables in the path settings ``keys`` of ``cfg``, in place (in order)."""
    for key in keys:
        value = get(cfg, key, None)
        if isinstance(value, str) and value != MISSING and (expanded := expand_path(value)) != value:
            _set(cfg, key, expanded)


def require(cfg: Mapping, key: str, what: str) -> None:
    """A mandatory setting: absent, empty or ``???`` is an error saying it is required."""
    value = get(cfg, key, None)
    if value is None or value == MISSING or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{key}= is required: give {what} ({key}=...)")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(cfg: Mapping, key: str, low: int, high: int | None = None, nullable: bool = False,
            also: tuple[int, ...] = (), what: str = "") -> None:
    """``key`` must be an integer in [low, high] (or one of ``also``, or null when ``nullable``)."""
    value = get(cfg, key)
    if value is _ABSENT or (value is None and nullable):
        return
    if _is_int(value) and (low <= value and (high is None or value <= high) or value in also):
        return
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    valid += "".join(f" or {a}" for a in also) + (" or null" if nullable else "")
    raise ValueError(f"{key}={value!r}: must be {valid}" + (f" ({what})" if what else ""))


def number(cfg: Mapping, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, nullable: bool = False, what: str = "") -> None:
    """``key`` must be a finite number within the bounds (an open bound excludes itself)."""
    value = get(cfg, key)
    if value is _ABSENT or (value is None and nullable):
        return
    ok = _is_number(value) and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if low is not None and high is not None:
        valid = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        valid = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        valid = f"a number {'<' if high_open else '<='} {high:g}"
    raise ValueError(f"{key}={value!r}: must be {valid}" + (" or null" if nullable else "")
                     + (f" ({what})" if what else ""))


def fraction_or_count(cfg: Mapping, key: str, what: str, nullable: bool = False) -> None:
    """Lightning's int-or-float settings (``val_check_interval``, ``limit_val_batches``): batches or a fraction."""
    value = get(cfg, key)
    if value is _ABSENT or (value is None and nullable):
        return
    if _is_int(value) and value >= 0 or _is_number(value) and 0.0 <= value <= 1.0:
        return
    raise ValueError(f"{key}={value!r}: must be an integer >= 0 (batches) or a number in [0, 1] (a fraction)"
                     + (" or null" if nullable else "") + f" ({what})")


def check_data_settings(cfg: Mapping) -> None:
    """The ``data.*`` numbers (training and ``scripts/prepare.py``)."""
    integer(cfg, "data.batch_size", 1, what="rows per micro-batch")
    integer(cfg, "data.seq_len", 2, nullable=True, what="tokens per training row")
    integer(cfg, "data.num_workers", 1, nullable=True, what="pretokenize processes; null: one per CPU core")
    integer(cfg, "data.loader_workers", 0, what="DataLoader worker processes")
    integer(cfg, "data.n_shards", 2, what="synthetic shards: data00 is validation")
    integer(cfg, "data.stories_per_shard", 1)
    integer(cfg, "data.records_per_shard", 1)
    if _is_int(v := get(cfg, "data.val_size", None)):
        integer(cfg, "data.val_size", 1, what="validation records of a small single-file source")
    elif v is not None:
        number(cfg, "data.val_size", 0, 1, low_open=True, high_open=True,
               what="the fraction of a small single-file source's records that validates")
    integer(cfg, "data.tokenizer_train_stories", 1)


def check_train_settings(cfg: Mapping) -> None:
    """Every numeric setting of a training config, before data preparation or model building."""
    integer(cfg, "seed", 0, 2**32 - 1, what="the random seed")
    check_data_settings(cfg)
    number(cfg, "optim.lr", 0, low_open=True, what="the peak learning rate")
    number(cfg, "optim.min_lr", 0, what="the learning rate the schedule ends at")
    number(cfg, "optim.weight_decay", 0)
    number(cfg, "optim.beta1", 0, 1, high_open=True)
    number(cfg, "optim.beta2", 0, 1, high_open=True)
    number(cfg, "optim.eps", 0, low_open=True)
    integer(cfg, "optim.warmup_steps", 0, nullable=True)
    number(cfg, "optim.warmup_ratio", 0, 1, high_open=True, nullable=True)
    if get(cfg, "lora.enabled", False):
        integer(cfg, "lora.rank", 1, what="the adapter rank r")
        number(cfg, "lora.alpha", 0, low_open=True, what="scaling alpha / rank")
        number(cfg, "lora.dropout", 0, 1, high_open=True)
    integer(cfg, "trainer.max_steps", 1, also=(-1,), what="optimizer steps; -1: until trainer.max_epochs")
    integer(cfg, "trainer.max_epochs", 1, also=(-1,), nullable=True)
    integer(cfg, "trainer.accumulate_grad_batches", 1)
    number(cfg, "trainer.gradient_clip_val", 0, nullable=True)
    integer(cfg, "trainer.log_every_n_steps", 1)
    fraction_or_count(cfg, "trainer.val_check_interval", "how often to validate", nullable=True)
    fraction_or_count(cfg, "trainer.limit_val_batches", "how much of the validation set to use", nullable=True)
    fraction_or_count(cfg, "trainer.limit_train_batches", "how much of the training set to use", nullable=True)
    if get(cfg, "trainer.limit_train_batches", None) == 0:
        raise ValueError("trainer.limit_train_batches=0: trains nothing; must be an integer >= 1 (batches) or a "
                         "number in (0, 1] (a fraction), or null")
    integer(cfg, "evaluation.adherence_n", 0, nullable=True, what="held-out instructions after training; 0: off")
    integer(cfg, "evaluation.max_new_tokens", 1)
    if get(cfg, "callbacks.samples", None):
        integer(cfg, "callbacks.samples.max_new_tokens", 1)
        number(cfg, "callbacks.samples.temperature", 0, what="0 = greedy")


def check_evaluate_settings(cfg: Mapping) -> None:
    """``scripts/evaluate.py``: the checkpoint is required, the numbers in range."""
    require(cfg, "ckpt", "the checkpoint to evaluate (a path or URL)")
    integer(cfg, "n", 0, nullable=True, what="held-out records; 0 or null: all of data00")
    integer(cfg, "max_new_tokens", 1, what="tokens generated per story")
    number(cfg, "temperature", 0, what="0 = greedy")
    integer(cfg, "batch_size", 1, what="prompts generated together")
    integer(cfg, "examples", 0, what="example stories printed")
    integer(cfg, "seed", 0)


def preflight(cfg: DictConfig) -> None:
    """Checks that need no data, before data preparation (which may download gigabytes)."""
    from llamalit.model.llama import ModelConfig  # torch: after the checks that need none
    from llamalit.utils.hub import parse_hub_id

    init_from = cfg.get("init_from")
    if init_from and not is_url(str(init_from)) and not Path(str(init_from)).exists() \
            and parse_hub_id(str(init_from)) is None:
        raise FileNotFoundError(f"init_from={init_from}: no such file or directory; give a checkpoint path, "
                                "URL or Hugging Face Hub id (org/name), or leave it empty to train from random weights")
    if not init_from:
        ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))  # the shape errors, now
