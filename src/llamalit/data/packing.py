"""Packing instruct examples into full rows (``data.packing``): example lengths, a packing plan, the dataset.

An instruct row holds one example, ``n`` tokens (prompt + BOS + story + EOS) then padding; its ``n - 1``
positions are x = tokens[:n-1] -> y = labels[1:n]. Packing concatenates the positions of several examples
into one row of ``T = row_len - 1`` positions, so far less of every batch is padding. The model keeps the
examples apart through two extra keys of each packed sample: ``positions`` (the RoPE position inside its own
example, restarting at 0) and ``segments`` (the example's number in the row); attention is masked to the
own segment (``Llama.hidden(tokens, positions=..., segments=...)``).

The plan (which examples share which row) is fixed by the seed for the whole run, so an epoch always has the
same number of packed rows and a resumed run reads the same stream; only the order of the packed rows is
reshuffled per ``(seed, epoch)``, like the unpacked datasets.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamalit.data.datasets import InstructRows, ShardFile, _seed_seq
from llamalit.model.llama import IGNORE_INDEX
from llamalit.utils.fileio import atomic_path

PLAN_STREAM = 0x5041434B  # second word of the plan's seed, so it never equals an epoch shuffle's stream
DEFAULT_WINDOW = 64
_BIN_BITS = 32  # an open bin's sort key: free positions << 32 | bin number


def row_lengths(labels: np.ndarray, ignore_index: int, chunk_rows: int = 4096) -> np.ndarray:
    """Example length of each row of a ``(rows, row_len)`` label array (a memmap is read ``chunk_rows`` at a time).

    Length = (last index whose label is counted) + 1; 0 for a row with no counted label. int32.
    """
    rows, row_len = labels.shape
    ramp = np.arange(1, row_len + 1, dtype=np.int16 if row_len < 2**15 else np.int32)
    out = np.empty(rows, dtype=np.int32)
    for start in range(0, rows, chunk_rows):
        counted = np.asarray(labels[start : start + chunk_rows]) != ignore_index
        out[start : start + len(counted)] = (counted * ramp).max(axis=1, initial=0)
    return out


def split_lengths(rows: InstructRows, chunk_rows: int = 4096) -> np.ndarray:
    """:func:`row_lengths` of every row of ``rows`` (all its shards, in global row order)."""
    parts = [row_lengths(m, rows.ignore_index, chunk_rows) for m in rows.label_maps()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def cached_split_lengths(rows: InstructRows, cache: Path) -> np.ndarray:
    """:func:`split_lengths`, kept in ``cache`` (``.npz``) and reused while the label files are unchanged.

    Reading every label row once costs seconds per million rows from a cold disk, on every rank of every
    run; the cache is keyed by each label file's name, size and modification time, written atomically, and
    silently skipped where the data directory is read-only.
    """
    key = np.array([f"{s.labels.name}:{s.labels.stat().st_size}:{s.labels.stat().st_mtime_ns}" for s in rows.shards])
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if saved["key"].tolist() == key.tolist():
                return saved["lengths"]
    except (OSError, KeyError, ValueError):
        pass
    lengths = split_lengths(rows)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=key, lengths=lengths)
    except OSError:
        pass
    return lengths


@dataclass(frozen=True)
class PackPlan:
    """Packed row ``r`` holds examples ``examples[bounds[r]:bounds[r + 1]]`` with ``sizes`` positions each."""

    examples: np.ndarray  # global row index of each example, grouped by packed row (int32 / int64)
    sizes: np.ndarray  # its positions, n - 1 (uint16 / int32)
    bounds: np.ndarray  # (packed rows + 1,) offsets into examples (int32 / int64)
    capacity: int  # positions of a packed row, T = row_len - 1

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def fill_rate(self) -> float:
        """Example positions / (packed rows x T)."""
        return float(self.sizes.sum(dtype=np.int64)) / max(len(self) * self.capacity, 1)


def _small(values: np.ndarray, limit: int, small: type, big: type = np.int64) -> np.ndarray:
    return values.astype(small if limit < np.iinfo(small).max else big)


def plan_packing(lengths: np.ndarray, capacity: int, seed: int, window: int = DEFAULT_WINDOW) -> PackPlan:
    """Pack the examples of ``lengths`` (tokens per row, :func:`row_lengths`) into rows of ``capacity`` positions.

    Examples of length < 2 (no position) are left out. The others are taken in a random order fixed by
    ``seed``; each goes into the fullest of at most ``window`` open rows where it fits (best fit); when none
    has room, the fullest open row is closed (if ``window`` rows are open) and a new row opened. A row with no
    free position closes at once. Same inputs -> same plan.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = np.maximum(lengths - 1, 0)
    if sizes.size and int(sizes.max()) > capacity:
        raise ValueError(f"an example of {int(sizes.max()) + 1} tokens does not fit a row of {capacity + 1}.")
    if window < 1:
        raise ValueError(f"packing window {window}: use at least 1 open row.")
    order = np.random.default_rng([seed % 2**63, PLAN_STREAM]).permutation(np.flatnonzero(sizes > 0))
    bin_of = _best_fit(sizes[order].tolist(), capacity, window)
    bins = np.asarray(bin_of, dtype=np.int64)
    n_rows = int(bins.max()) + 1 if bins.size else 0
    grouped = order[np.argsort(bins, kind="stable")]  # by packed row, in placement order inside each
    bounds = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=n_rows))])
    return PackPlan(examples=_small(grouped, len(lengths), np.int32),
                    sizes=_small(sizes[grouped], capacity, np.uint16, np.int32),
                    bounds=_small(bounds, len(grouped), np.int32), capacity=capacity)


def _best_fit(sizes: list[int], capacity: int, window: int) -> list[int]:
    """The row number of each size: best fit over a window of open rows (kept as sorted int keys)."""
    mask = (1 << _BIN_BITS) - 1
    open_keys: list[int] = []  # free << 32 | row, ascending: the fullest open row first
    out = [0] * len(sizes)
    n_rows = 0
    for j, size in enumerate(sizes):
        k = bisect_left(open_keys, size << _BIN_BITS)  # the open row with the least room that still fits
        if k < len(open_keys):
            key = open_keys.pop(k)
            row, free = key & mask, (key >> _BIN_BITS) - size
        else:
            if len(open_keys) >= window:
                del open_keys[0]  # close the fullest
            row, free = n_rows, capacity - size
            n_rows += 1
        out[j] = row
        if free:
            insort(open_keys, (free << _BIN_BITS) | row)
    return out


def packing_stats(lengths: np.ndarray, plan: PackPlan) -> dict[str, float | int]:
    """Examples, rows and fill rates of ``plan`` against the padded layout (one example a row) of ``lengths``."""
    used = int(plan.sizes.sum(dtype=np.int64))
    return {"examples": int(len(plan.examples)), "skipped": int((np.asarray(lengths) < 2).sum()),
            "rows": int(len(lengths)), "packed_rows": len(plan), "capacity": plan.capacity,
            "fill_rate": plan.fill_rate, "padded_fill_rate": used / max(len(lengths) * plan.capacity, 1)}


class PackedInstructRows(InstructRows):
    """Instruct examples packed into rows of ``T = row_len - 1`` positions; index = packed row.

    A sample is ``{"input_ids", "labels", "positions", "segments"}``, each ``LongTensor[T]``: the examples'
    x/y positions back to back (labels -100 where not counted), ``positions`` restarting at 0 for every example,
    ``segments`` 0, 1, 2, ... per example. The tail after the last example is padding: input ``pad_id``, label
    -100, segment = last + 1, positions 0, 1, ... (a padded query then attends to itself only).
    Pickles without memmaps; the plan travels as three compact arrays.
    """

    def __init__(self, shards: list[ShardFile], row_len: int, vocab_size: int, ignore_index: int, pad_id: int,
                 seed: int, window: int = DEFAULT_WINDOW, lengths: np.ndarray | None = None) -> None:
        super().__init__(shards, row_len, vocab_size, ignore_index)
        self.pad_id = int(pad_id)
        lengths = split_lengths(self) if lengths is None else np.asarray(lengths)
        if len(lengths) != self.n_rows:
            raise ValueError(f"{len(lengths)} example lengths for {self.n_rows} rows.")
        self.plan = plan_packing(lengths, row_len - 1, seed, window)
        self.stats = packing_stats(lengths, self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def epoch_samples(self) -> int:
        """Packed rows in one epoch: all of them, the same number every epoch."""
        return len(self.plan)

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """A permutation of the packed rows, fixed by ``(seed, epoch)`` (the plan itself never changes)."""
        return _seed_seq(seed, epoch).permutation(len(self.plan)).astype(np.int64)

    def ordered(self) -> np.ndarray:
        """All packed rows in plan order."""
        return np.arange(len(self.plan), dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self.plan):
            raise IndexError(f"packed row {index} out of range [0, {len(self.plan)})")
        t = self.plan.capacity
        lo, hi = int(self.plan.bounds[index]), int(self.plan.bounds[index + 1])
        input_ids = np.full(t, self.pad_id, dtype=np.int64)
        labels = np.full(t, IGNORE_INDEX, dtype=np.int64)
        positions = np.empty(t, dtype=np.int64)
        segments = np.full(t, hi - lo, dtype=np.int64)  # the padded tail's own segment
        at = 0
        for segment, k in enumerate(range(lo, hi)):
            size = int(self.plan.sizes[k])
            tokens, labs = self.read_row(int(self.plan.examples[k]), size + 1)
            input_ids[at : at + size] = tokens[:-1]
            labels[at : at + size] = labs[1:]
            positions[at : at + size] = np.arange(size)
            segments[at : at + size] = segment
            at += size
        positions[at:] = np.arange(t - at)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "positions": torch.from_numpy(positions), "segments": torch.from_numpy(segments)}
