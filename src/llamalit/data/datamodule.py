"""``LlamaDataModule``: prepared shards -> resumable, rank-sharded DataLoaders for Lightning.

The train split is a stream of epochs; epoch ``e`` is a shuffle fixed by ``(seed, e)`` (see
``PretrainWindows.shuffled`` / ``InstructRows.shuffled``). Position in the stream = (epoch, global samples
consumed in it); rank ``r`` of ``W`` reads the epoch's samples ``r, r + W, ...``, so at every step the ranks
together consume one contiguous block of the epoch and never the same sample. The position is saved by
``state_dict()`` in the Lightning checkpoint, and a restored run starts right after the last consumed batch.

A batch counts as consumed when the train loader yields it. Lightning 2.x fetches nothing ahead from a loader
with a length (ours always has one), so under a Trainer that is the batch handed to the model; the tests resume
a Trainer from a mid-epoch checkpoint to hold Lightning to it.

``data.packing`` (instruct data): the TRAIN split becomes ``PackedInstructRows`` (several examples a row, batch
keys ``positions`` and ``segments`` added; see ``llamalit.data.packing``). Its plan is fixed by the seed, so
the epoch length and the resumable position work exactly as unpacked. Validation is never packed: val/loss
is the same per-row evaluation in packed and padded runs, so the two stay comparable.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from llamalit.data.datasets import (
    InstructRows,
    PretrainWindows,
    manifest_path,
    read_manifest,
    shard_files,
)
from llamalit.data.manifest import ManifestMissing, check_tokenizer
from llamalit.data.packing import PackedInstructRows, cached_split_lengths
from llamalit.data.prepare import check_data_dir, stale_settings
from llamalit.settings.device import DEVICE_TYPES, resolve_device_settings

log = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass
class StreamPosition:
    """Where the train stream stands: the epoch, and the samples (all ranks together) consumed in it."""

    epoch: int = 0
    sample: int = 0


class TrainSampler(DistributedSampler):
    """This rank's share of the remaining samples of the current epoch; the epoch comes from the position.

    A ``DistributedSampler`` subclass so Lightning keeps it under DDP instead of wrapping it; Lightning's
    ``set_epoch`` is ignored because the epoch is part of the (resumable) position.
    """

    def __init__(self, dataset: PretrainWindows | InstructRows, batch_size: int, rank: int, world_size: int,
                 seed: int, position: StreamPosition) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.step = batch_size * world_size  # global samples consumed per batch step
        self.batches_per_epoch = dataset.epoch_samples // self.step
        self.position = position
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:  # noqa: ARG002 - the position owns the epoch
        return None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch`` (cached for the current one)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.dataset.shuffled(self.seed, epoch))
        return self._cached[1]

    def _normalize(self) -> None:
        pos = self.position
        if pos.sample >= self.batches_per_epoch * self.step:
            pos.epoch, pos.sample = pos.epoch + 1, 0
        pos.sample -= pos.sample % self.step  # a position saved with another batch size/world size

    def __iter__(self) -> Iterator[int]:
        self._normalize()
        order = self.epoch_indices(self.position.epoch)[: self.batches_per_epoch * self.step]
        return iter(order[self.position.sample + self.rank :: self.num_replicas].tolist())

    def advance(self) -> None:
        """Record one consumed batch (on every rank: one step of ``batch_size * world_size`` samples)."""
        self.position.sample += self.step
        self._normalize()


class EvalSampler(DistributedSampler):
    """The ordered evaluation pass, rank ``r`` reading samples ``r, r + W, ...`` (a tail of < W is dropped)."""

    def __init__(self, dataset: PretrainWindows | InstructRows, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        order = dataset.ordered()
        self.indices = order[: len(order) // world_size * world_size][rank::world_size].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class ResumableLoader(DataLoader):
    """A DataLoader over a ``TrainSampler``: iteration starts at the sampler's position, each yield advances it.

    ``state_dict``/``load_state_dict`` expose that position, which also tells Lightning the loader is resumable.
    """

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            self.sampler.advance()
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.position.epoch, "samples_in_epoch": self.sampler.position.sample}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.position.epoch = int(state["epoch"])
        self.sampler.position.sample = int(state["samples_in_epoch"])


def _plain(cfg: Mapping) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return dict(cfg)


def _packing_setting(value: Any) -> bool | None:
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str) and value.lower() in ("auto", "null", "none", "true", "false"):
        return {"true": True, "false": False}.get(value.lower())
    raise ValueError(f"data.packing={value!r}: use true, false or null (auto: packed when training on CUDA).")


class LlamaDataModule(L.LightningDataModule):
    """Prepared shards of ``cfg`` (a ``conf/data`` dict) as train/val DataLoaders of
    ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` (labels -100 where not counted).

    With packing on (``data.packing``: true, or null = auto: on when the attached Trainer trains on CUDA), the
    instruct TRAIN batches also hold ``positions`` and ``segments`` (``LongTensor[B, T]``, see
    ``PackedInstructRows``); validation batches never do, so val/loss stays comparable with padded runs.
    """

    def __init__(self, cfg: Mapping, cache_dir: str | Path = "~/.cache/llamalit", seed: int = 1337) -> None:
        super().__init__()
        self.cfg = _plain(cfg)
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed = int(seed)
        name = self.cfg.get("name") or "data"
        self.data_dir = Path(self.cfg["dir"]).expanduser() if self.cfg.get("dir") else self.cache_dir / "data" / name
        self.batch_size = int(self.cfg["batch_size"])
        self.loader_workers = int(self.cfg.get("loader_workers") or 0)
        self._manifest: dict[str, Any] | None = None
        self._train: PretrainWindows | InstructRows | None = None
        self._val: PretrainWindows | InstructRows | None = None
        self._position = StreamPosition()
        self._train_sampler: TrainSampler | None = None
        self._restored_epoch_samples: int | None = None
        self._restored_packed: bool | None = None
        self.packing_setting = _packing_setting(self.cfg.get("packing", False))
        self._train_key: tuple[bool, int | None] | None = None  # (packed, plan seed) the train split was built with
        self._lengths: np.ndarray | None = None  # example lengths of the train split (read once, for packing)

    # ---- preparation and manifest -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Run the preparation (``llamalit.data.prepare.prepare``) when the shards are missing or stale."""
        if self._ready():
            return
        from llamalit.data.prepare import prepare

        written = manifest_path(prepare(self.cfg, self.cache_dir))
        if written.parent.resolve() != self.data_dir.resolve():
            warnings.warn(f"prepare() wrote {written}, not into data.dir {self.data_dir}; reading from there "
                          "(other ranks of a multi-node run will not find it: set data.dir).", stacklevel=2)
            self.data_dir = written.parent
        self._manifest = None

    def _ready(self) -> bool:
        """True when ``data_dir`` holds usable shards made with these settings; False when they are to be
        prepared (no manifest, or one made with other settings). A manifest that exists but is broken (bad
        field, missing or wrong-size shard, another tokenizer) raises: preparing over it would hide the cause."""
        check_data_dir(self.data_dir)
        try:
            manifest = read_manifest(self.data_dir)
        except ManifestMissing:
            return False
        if changed := stale_settings(manifest, self.cfg):
            warnings.warn(f"{manifest_path(self.data_dir)} was prepared with other settings ({'; '.join(changed)})"
                          "; preparing the data again.", stacklevel=3)
            return False
        try:
            self._check_settings(manifest)
        except ValueError:
            return False  # another kind / row length: prepared again (setup reports it if that does not help)
        for split in ("train", "val"):
            shard_files(manifest, self.data_dir, split)
        self._check_tokenizer(manifest)
        return True

    def _check_tokenizer(self, manifest: dict[str, Any]) -> None:
        """The manifest's tokenizer file must be the one recorded (sha256, piece count): a run copies it as its
        own. A missing file is an error for data the preparation wrote (it always writes one), else a warning."""
        where = manifest_path(self.data_dir)
        path = manifest["tokenizer"].get("path")
        if (not path or not (self.data_dir / Path(path).expanduser()).is_file()) and "prepared_from" not in manifest:
            warnings.warn(f"{where} names no tokenizer file that exists ({path!r}): training works, but the run "
                          "cannot sample text or ship a tokenizer.", stacklevel=3)
            return
        check_tokenizer(manifest, where)

    @property
    def manifest(self) -> dict[str, Any]:
        """The validated ``manifest.json`` of ``data_dir`` (read on first use; its tokenizer file is checked)."""
        if self._manifest is None:
            check_data_dir(self.data_dir)
            manifest = read_manifest(self.data_dir)
            self._check_tokenizer(manifest)
            self._manifest = manifest
        return self._manifest

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["pad_id"])

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer the shards were made with (relative manifest paths resolve against ``data_dir``)."""
        path = self.manifest["tokenizer"].get("path")
        return None if path is None else (self.data_dir / Path(path).expanduser())

    @property
    def seq_len(self) -> int:
        """Model input length: ``data.seq_len`` for pretraining windows, row length - 1 for instruct rows."""
        if self.cfg.get("kind") == "pretrain" or self.manifest["kind"] == "pretrain":
            return int(self.cfg["seq_len"])
        return int(self.manifest["seq_len"]) - 1

    def _check_settings(self, manifest: dict[str, Any]) -> None:
        where = manifest_path(self.data_dir)
        want_kind, kind = self.cfg.get("kind"), manifest["kind"]
        if want_kind and want_kind != kind:
            raise ValueError(f"data.kind is {want_kind!r} but {where} holds {kind!r} shards; point data.dir "
                             "elsewhere or prepare the data again.")
        seq_len = self.cfg.get("seq_len")
        if kind == "pretrain" and not (isinstance(seq_len, int) and seq_len >= 1):
            raise ValueError(f"data.seq_len must be a positive integer for pretraining windows, got {seq_len!r}.")
        if kind == "instruct" and seq_len is not None and int(seq_len) != manifest["seq_len"]:
            raise ValueError(
                f"data.seq_len={seq_len} but the shards in {where} hold rows of {manifest['seq_len']} tokens; "
                f"prepare them again with data.seq_len={seq_len} or set data.seq_len={manifest['seq_len']}."
            )

    # ---- datasets -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the manifest, check every shard file's size, and build the datasets the stage needs.

        The train split is (re)built when packing, resolved now, differs from the one it was built with (a
        ``setup`` before the Trainer is attached cannot know the device of ``data.packing=null``), or when a
        restored state changed the seed of the packing plan.
        """
        manifest = self.manifest
        self._check_settings(manifest)
        if stage in (None, "fit"):
            packed = self.packing_enabled
            key = (packed, self.seed if packed else None)
            if self._train is None or key != self._train_key:
                self._train = self._dataset(manifest, "train", packed)
                self._train_key = key
                if packed:
                    log.info("data.packing: %s", self.packing_stats)
        if self._val is None and stage in (None, "fit", "validate", "test"):
            self._val = self._dataset(manifest, "val")

    @property
    def packing_enabled(self) -> bool:
        """Whether the train split is packed: ``data.packing``, or for null (auto) whether the attached Trainer
        trains on CUDA (no Trainer: off). ``data.packing=true`` on pretraining data raises."""
        setting, kind = self.packing_setting, self.manifest["kind"]
        if setting and kind == "pretrain":
            raise ValueError(f"data.packing=true but {manifest_path(self.data_dir)} holds pretraining shards: "
                             "their windows are already dense (no padding). Set data.packing=false.")
        if setting is None:  # train.py passes the resolved value; a DataModule used alone resolves it here
            device = getattr(getattr(getattr(self.trainer, "strategy", None), "root_device", None), "type", "cpu")
            setting = resolve_device_settings({"data": {"kind": kind, "packing": None}},
                                              device if device in DEVICE_TYPES else "cpu").packing
        return bool(setting) and kind == "instruct"

    @property
    def packing_stats(self) -> dict[str, Any]:
        """Packing of the train split: ``examples``, ``skipped`` (rows with no counted position), ``rows``,
        ``packed_rows``, ``capacity`` (positions a row), ``fill_rate`` and ``padded_fill_rate`` (example
        positions / all positions, packed vs one example a row); ``{"enabled": False}`` when not packed."""
        if isinstance(self._train, PackedInstructRows):
            return {"enabled": True, **self._train.stats}
        return {"enabled": False}

    def _dataset(self, manifest: dict[str, Any], split: str,
                 packed: bool = False) -> PretrainWindows | InstructRows:
        shards = shard_files(manifest, self.data_dir, split)
        vocab = int(manifest["tokenizer"]["vocab_size"])
        ignore = int(manifest.get("ignore_index", -100))
        if manifest["kind"] == "pretrain":
            ds: PretrainWindows | InstructRows = PretrainWindows(shards, int(self.cfg["seq_len"]), vocab)
            unit = f"windows of seq_len + 1 = {int(self.cfg['seq_len']) + 1} tokens"
        elif packed:
            if self._lengths is None:
                self._lengths = cached_split_lengths(InstructRows(shards, manifest["seq_len"], vocab, ignore),
                                                     self.data_dir / f"lengths_{split}.npz")
            ds = PackedInstructRows(shards, manifest["seq_len"], vocab, ignore, int(manifest["pad_id"]), self.seed,
                                    lengths=self._lengths)
            unit = "packed rows (no example has a counted label)"
        else:
            ds = InstructRows(shards, manifest["seq_len"], vocab, ignore)
            unit = "rows"
        if ds.epoch_samples == 0:
            sizes = ", ".join(f"{s.tokens.name}: {s.n_elements} tokens" for s in shards) or "no shards"
            raise ValueError(f"the {split} split of {manifest_path(self.data_dir)} yields no {unit} ({sizes}); "
                             "lower data.seq_len or prepare more data.")
        return ds

    # ---- loaders --------------------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.loader_workers
        return dict(batch_size=self.batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled epochs from the saved position; ``len()`` = batches per epoch on this rank."""
        self.setup("fit")  # builds the train split, or rebuilds it if packing or the plan's seed changed
        assert self._train is not None
        rank, world = self._replicas()
        sampler = TrainSampler(self._train, self.batch_size, rank, world, self.seed, self._position)
        if sampler.batches_per_epoch == 0:
            raise ValueError(f"the train split has {self._train.epoch_samples} samples per epoch, fewer than "
                             f"batch_size {self.batch_size} x {world} ranks; lower data.batch_size or add data.")
        expected, packed = self._restored_epoch_samples, isinstance(self._train, PackedInstructRows)
        if self._restored_packed is not None and self._restored_packed != packed:
            warnings.warn(f"the checkpoint's data position was recorded with packing {'on' if not packed else 'off'}"
                          f", this run has it {'on' if packed else 'off'} (data.packing={self.packing_setting}): "
                          "the resumed stream is not the one the run started with.", stacklevel=2)
        elif expected is not None and expected != self._train.epoch_samples:
            warnings.warn(f"the checkpoint's data position was recorded on a train split of {expected} samples "
                          f"per epoch, this one has {self._train.epoch_samples}: the shards changed, so the "
                          "resumed stream is not the one the run started with.", stacklevel=2)
        self._train_sampler = sampler
        return ResumableLoader(self._train, sampler=sampler, drop_last=True, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The val shards' ordered pass (non-overlapping windows / every row), split across ranks."""
        if self._val is None:
            self.setup("validate")
        assert self._val is not None
        rank, world = self._replicas()
        return DataLoader(self._val, sampler=EvalSampler(self._val, rank, world), drop_last=False,
                          **self._loader_kwargs())

    # ---- position in the data -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The train stream's position (plain ints, saved in the Lightning checkpoint)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self._position.epoch,
            "samples_in_epoch": self._position.sample,
            "epoch_samples": None if self._train is None else self._train.epoch_samples,
            "packed": isinstance(self._train, PackedInstructRows),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the train stream after the last consumed batch of ``state_dict``."""
        missing = {"version", "seed", "epoch", "samples_in_epoch"} - set(state_dict)
        if missing or state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"not a LlamaDataModule state (version {_STATE_VERSION}): missing {sorted(missing)} "
                             f"or version {state_dict.get('version')!r}.")
        if int(state_dict["seed"]) != self.seed:
            warnings.warn(f"resuming the data stream of seed {state_dict['seed']} (this run's seed is {self.seed}).",
                          stacklevel=2)
            self.seed = int(state_dict["seed"])
        self._position.epoch = int(state_dict["epoch"])
        self._position.sample = int(state_dict["samples_in_epoch"])
        self._restored_epoch_samples = state_dict.get("epoch_samples")
        self._restored_packed = state_dict.get("packed")
