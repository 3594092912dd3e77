"""Read prepared shards through ``manifest.json`` alone: the shard files of a split and the map-style datasets.

The manifest reader itself is :func:`llamalit.data.manifest.read_manifest` (re-exported here).

``PretrainWindows`` serves windows of ``seq_len + 1`` tokens from flat token shards (x = w[:-1], y = w[1:]);
``InstructRows`` serves the ``rows x seq_len`` rows of instruct shards (x = tokens[:-1], y = labels[1:]).
Both memmap their files lazily, so they pickle cheaply to DataLoader workers, and both know how to lay out a
shuffled epoch (deterministic from a seed and the epoch number) and an ordered evaluation pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llamalit.data.manifest import MANIFEST, ManifestError, manifest_path, read_manifest
from llamalit.model.llama import IGNORE_INDEX

MANIFEST_NAME = MANIFEST  # the old name of the file name constant
__all__ = ["MANIFEST_NAME", "ManifestError", "ShardFile", "InstructRows", "PretrainWindows", "manifest_path",
           "read_manifest", "shard_files"]


@dataclass(frozen=True)
class ShardFile:
    """One shard as the manifest describes it, with absolute paths and its expected element count."""

    split: str
    source: str
    tokens: Path
    labels: Path | None
    token_dtype: str
    label_dtype: str
    rows: int | None
    n_elements: int  # tokens in the token file (rows * seq_len for instruct shards)


def shard_files(manifest: dict[str, Any], root: str | Path, split: str) -> list[ShardFile]:
    """The shards of ``split`` with paths resolved against ``root``; each file's size is checked."""
    root = Path(root)
    out = []
    for spec in manifest["shards"]:
        if spec["split"] != split:
            continue
        instruct = manifest["kind"] == "instruct"
        n = spec["rows"] * manifest["seq_len"] if instruct else spec["n_tokens"]
        shard = ShardFile(
            split=split,
            source=str(spec.get("source", spec["tokens"])),
            tokens=root / spec["tokens"],
            labels=root / spec["labels"] if instruct else None,
            token_dtype=spec.get("token_dtype", "uint16"),
            label_dtype=spec.get("label_dtype", "int32"),
            rows=spec["rows"] if instruct else None,
            n_elements=n,
        )
        _check_size(shard.tokens, shard.token_dtype, n, root)
        if shard.labels is not None:
            _check_size(shard.labels, shard.label_dtype, n, root)
        out.append(shard)
    return out


def _again(root: Path) -> str:
    return (f"Restore the file, or prepare again: `python scripts/prepare.py data=NAME data.dir={root}` "
            f"(llamalit-prepare), or delete {root} and training prepares it.")


def _check_size(path: Path, dtype: str, n_elements: int, root: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"shard file {path} is missing (listed in {root / MANIFEST_NAME}); {_again(root)}")
    itemsize = np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != n_elements * itemsize:
        how = "shorter" if size < n_elements * itemsize else "longer"
        raise ValueError(
            f"shard file {path} holds {size // itemsize} {dtype} values ({size} bytes) but "
            f"{root / MANIFEST_NAME} says {n_elements}: the file is {how} than the manifest says "
            f"(interrupted copy?). {_again(root)}"
        )


def _open(path: Path, dtype: str, n: int, shape: tuple[int, ...] | None = None) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=shape or (n,))


def _seed_seq(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, epoch])


class _LazyShards(Dataset):
    """Holds shard descriptions; memmaps are opened on first use in each process and never pickled."""

    def __init__(self, shards: list[ShardFile], vocab_size: int) -> None:
        self.shards = [s for s in shards if s.n_elements > 0]
        self.vocab_size = vocab_size
        self._maps: dict[int, tuple[np.memmap, np.memmap | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _locate(self, index: int, unit: str) -> tuple[int, int, ShardFile]:
        """(shard number, position inside that shard, shard) of a global index; ``_ends``/``_bases`` per subclass."""
        index, total = int(index), int(self._ends[-1]) if len(self._ends) else 0
        if not 0 <= index < total:
            raise IndexError(f"{unit} {index} out of range [0, {total})")
        i = int(np.searchsorted(self._ends, index, side="right"))
        return i, index - int(self._bases[i]), self.shards[i]

    def _check_ids(self, ids: np.ndarray, shard: ShardFile, where: int) -> None:
        top = int(ids.max())
        if top >= self.vocab_size:
            raise ValueError(
                f"{shard.tokens}: token id {top} near element {where} is >= vocab_size {self.vocab_size} "
                "of the manifest's tokenizer; the shard does not match its tokenizer, prepare it again."
            )


class PretrainWindows(_LazyShards):
    """Windows of ``seq_len + 1`` tokens at any start inside a flat token shard; index = global start."""

    def __init__(self, shards: list[ShardFile], seq_len: int, vocab_size: int) -> None:
        super().__init__(shards, vocab_size)
        self.seq_len = seq_len
        starts = [max(s.n_elements - seq_len, 0) for s in self.shards]  # valid window starts per shard
        self._ends = np.cumsum(starts, dtype=np.int64)
        self._bases = self._ends - np.asarray(starts, dtype=np.int64)
        # Non-overlapping windows (sharing one boundary token): the ones that cover each shard once.
        self._aligned = [(s.n_elements - 1) // seq_len if n > 0 else 0 for s, n in zip(self.shards, starts)]

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def epoch_samples(self) -> int:
        """Windows in one epoch: as many as cover the tokens once."""
        return int(sum(self._aligned))

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """An epoch of window starts at random offsets, in random order, fixed by ``(seed, epoch)``.

        Stratified like llama2.c's uniform draws but without repeats: window k of a shard starts at a uniform
        random offset in ``[k * seq_len, (k + 1) * seq_len)``, so an epoch covers the tokens about once and no
        two samples of an epoch (on any rank) share a start.
        """
        rng = _seed_seq(seed, epoch)
        parts = []
        for base, k, shard in zip(self._bases, self._aligned, self.shards):
            lo = self.seq_len * np.arange(k, dtype=np.int64)
            span = np.minimum(self.seq_len, shard.n_elements - self.seq_len - lo)  # >= 1 for every k
            parts.append(base + lo + (rng.random(k) * span).astype(np.int64))
        starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return starts[rng.permutation(len(starts))]

    def ordered(self) -> np.ndarray:
        """The non-overlapping windows in shard order (the evaluation pass)."""
        parts = [b + self.seq_len * np.arange(k, dtype=np.int64) for b, k in zip(self._bases, self._aligned)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i, offset, shard = self._locate(index, "window start")
        if i not in self._maps:
            self._maps[i] = (_open(shard.tokens, shard.token_dtype, shard.n_elements), None)
        window = np.asarray(self._maps[i][0][offset : offset + self.seq_len + 1], dtype=np.int64)
        self._check_ids(window, shard, offset)
        w = torch.from_numpy(window)
        return {"input_ids": w[:-1], "labels": w[1:]}


class InstructRows(_LazyShards):
    """Rows of instruct shards; index = global row. Labels use ``IGNORE_INDEX`` (-100) where not counted."""

    def __init__(self, shards: list[ShardFile], row_len: int, vocab_size: int, ignore_index: int) -> None:
        super().__init__(shards, vocab_size)
        self.row_len = row_len
        self.ignore_index = ignore_index
        rows = [s.rows or 0 for s in self.shards]
        self._ends = np.cumsum(rows, dtype=np.int64)
        self._bases = self._ends - np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def epoch_samples(self) -> int:
        """Rows in one epoch: every row once."""
        return len(self)

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """A permutation of all rows, fixed by ``(seed, epoch)``."""
        return _seed_seq(seed, epoch).permutation(len(self)).astype(np.int64)

    def ordered(self) -> np.ndarray:
        """All rows in shard order (the evaluation pass)."""
        return np.arange(len(self), dtype=np.int64)

    @property
    def n_rows(self) -> int:
        """Rows in all shards of the split."""
        return int(self._ends[-1]) if len(self._ends) else 0

    def label_maps(self) -> list[np.memmap]:
        """Each shard's labels as a ``(rows, row_len)`` memmap (not kept: for one pass over the split)."""
        return [_open(s.labels, s.label_dtype, s.n_elements, (s.rows, self.row_len)) for s in self.shards]

    def read_row(self, index: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) of global row ``index`` (its first ``n`` entries), int64, labels -100 where not counted.

        Raises when a token id or a counted label is outside the manifest's vocabulary.
        """
        i, row, shard = self._locate(index, "row")
        if i not in self._maps:
            shape = (shard.rows, self.row_len)
            self._maps[i] = (
                _open(shard.tokens, shard.token_dtype, shard.n_elements, shape),
                _open(shard.labels, shard.label_dtype, shard.n_elements, shape),
            )
        tokens_mm, labels_mm = self._maps[i]
        n = self.row_len if n is None else n
        tokens = np.asarray(tokens_mm[row, :n], dtype=np.int64)
        labels = np.asarray(labels_mm[row, :n], dtype=np.int64)
        self._check_ids(tokens, shard, row * self.row_len)
        ignored = labels == self.ignore_index
        if (labels[~ignored] < 0).any() or (labels[~ignored] >= self.vocab_size).any():
            raise ValueError(
                f"{shard.labels}: row {row} has a label outside [0, {self.vocab_size}) that is not the "
                f"ignore_index {self.ignore_index}; prepare the shard again."
            )
        labels[ignored] = IGNORE_INDEX
        return tokens, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, labels = self.read_row(index)
        return {"input_ids": torch.from_numpy(tokens[:-1]), "labels": torch.from_numpy(labels[1:])}
