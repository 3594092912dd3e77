"""data.packing: example lengths from label rows, the packing plan, PackedInstructRows and the datamodule."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llamalit.data.datamodule import LlamaDataModule
from llamalit.data.datasets import InstructRows, read_manifest, shard_files
from llamalit.data.packing import PackedInstructRows, plan_packing, row_lengths, split_lengths
from llamalit.data.pretokenize import IGNORE_INDEX, instruct_rows

PAIRS = [("Write a story. Possible story:", "Tom ran to the park."),
         ("Write a story. In the story, try to use the verb \"eat\". Possible story:", "Sue ate a big red apple."),
         ("Write a story.", "The cat sat. The dog ran. They played all day long in the sun."),
         ("Go.", "Hi.")]


def _write_shards(root: Path, tok, seq_len: int, shards: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> Path:
    """Shard files + manifest.json as the preparation writes them (CONTRACT.md layout)."""
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, (split, tokens, labels) in shards.items():
        tokens.tofile(root / f"{name}.tokens.bin")
        labels.tofile(root / f"{name}.labels.bin")
        specs.append({"split": split, "source": f"{name}.json", "tokens": f"{name}.tokens.bin",
                      "labels": f"{name}.labels.bin", "token_dtype": "uint16", "label_dtype": "int32",
                      "rows": len(tokens), "n_tokens": int(tokens.size), "dropped": 0})
    manifest = {"format": "llamalit-shards/1", "kind": "instruct", "seq_len": seq_len, "ignore_index": IGNORE_INDEX,
                "pad_id": tok.eos_id, "tokenizer": {"path": str(tok.path), "sha256": tok.sha256,
                                                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                                                    "eos_id": tok.eos_id}, "shards": specs}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cfg(root: Path, packing, batch_size: int = 4, kind: str = "instruct", seq_len: int = 256) -> dict:
    return {"name": "t", "kind": kind, "source": None, "tokenizer": None, "dir": str(root), "seq_len": seq_len,
            "val_shards": ["data00"], "batch_size": batch_size, "loader_workers": 0, "packing": packing}


def _packed(manifest_file: Path, seed: int = 3) -> tuple[InstructRows, PackedInstructRows]:
    m = read_manifest(manifest_file)
    shards = shard_files(m, manifest_file.parent, "train")
    args = (shards, m["seq_len"], m["tokenizer"]["vocab_size"], m["ignore_index"])
    return InstructRows(*args), PackedInstructRows(*args, m["pad_id"], seed)


# ---- lengths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_lengths_are_last_counted_label_plus_one(tmp_path, tiny_tokenizer, train_on_inputs: bool) -> None:
    tok = tiny_tokenizer
    tokens, labels, dropped = instruct_rows(tok, PAIRS, 40, train_on_inputs=train_on_inputs)
    assert dropped == 0
    want = [len(tok.encode(p, bos=False)) + len(tok.encode(a, bos=True, eos=True)) for p, a in PAIRS]
    labels = np.concatenate([labels, np.full((1, 40), IGNORE_INDEX, np.int32)])  # a row with nothing counted
    labels[1, :3] = IGNORE_INDEX  # counted labels need not start at 0: the last one decides
    labels.tofile(tmp_path / "labels.bin")
    mm = np.memmap(tmp_path / "labels.bin", dtype=np.int32, mode="r", shape=labels.shape)
    for chunk in (1, 2, 4096):  # chunks of rows over a memmap, ragged last chunk
        np.testing.assert_array_equal(row_lengths(mm, IGNORE_INDEX, chunk_rows=chunk), want + [0])
    full = np.full((2, 6), 7, np.int32)
    full[1, 5] = -1
    np.testing.assert_array_equal(row_lengths(full, ignore_index=-1), [6, 5])  # the manifest's ignore_index


# ---- plan ---------------------------------------------------------------------------------------------------
def test_plan_is_deterministic_fits_and_holds_every_example_once() -> None:
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(2, 121, 3000), [0, 1, 0, 120, 2]])  # 0/1: nothing to pack
    capacity = 119
    plan = plan_packing(lengths, capacity, seed=5, window=16)
    again = plan_packing(lengths, capacity, seed=5, window=16)
    for a, b in ((plan.examples, again.examples), (plan.sizes, again.sizes), (plan.bounds, again.bounds)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(plan_packing(lengths, capacity, seed=6, window=16).examples, plan.examples)
    per_row = np.add.reduceat(plan.sizes.astype(np.int64), plan.bounds[:-1])
    assert per_row.max() <= capacity and (np.diff(plan.bounds) >= 1).all()
    np.testing.assert_array_equal(np.sort(plan.examples), np.flatnonzero(lengths >= 2))  # each exactly once
    np.testing.assert_array_equal(plan.sizes, lengths[plan.examples] - 1)
    padded = (lengths[lengths >= 2] - 1).sum() / (len(lengths) * capacity)
    assert plan.fill_rate > 0.9 > padded + 0.3                                    # far denser than padding
    assert plan_packing(lengths, capacity, seed=5, window=64).fill_rate >= plan_packing(
        lengths, capacity, seed=5, window=1).fill_rate
    with pytest.raises(ValueError, match="121 tokens does not fit a row of 120"):
        plan_packing(np.array([121]), capacity, seed=0)


# ---- the dataset --------------------------------------------------------------------------------------------
def test_packed_rows_are_the_unpacked_examples_back_to_back(prepared_instruct: Path) -> None:
    rows, packed = _packed(prepared_instruct)
    t = rows.row_len - 1
    lengths = split_lengths(rows)
    seen, tails = [], 0
    for r in range(len(packed)):
        s = packed[r]
        assert set(s) == {"input_ids", "labels", "positions", "segments"}
        assert all(v.dtype == torch.int64 and v.shape == (t,) for v in s.values())
        seg = s["segments"].numpy()
        assert (np.diff(seg) >= 0).all() and (np.diff(seg) <= 1).all() and seg[0] == 0  # 0, 1, 2, ... in order
        examples = packed.plan.examples[packed.plan.bounds[r] : packed.plan.bounds[r + 1]]
        at = 0
        for k, ex in enumerate(examples):
            size = int(lengths[ex]) - 1
            part = slice(at, at + size)
            unpacked = rows[int(ex)]
            assert (seg[part] == k).all()
            np.testing.assert_array_equal(s["input_ids"][part], unpacked["input_ids"][:size])
            np.testing.assert_array_equal(s["labels"][part], unpacked["labels"][:size])
            assert (unpacked["labels"][size:] == -100).all()                   # nothing counted is lost
            np.testing.assert_array_equal(s["positions"][part], np.arange(size))  # RoPE restarts per example
            at += size
            seen.append(int(ex))
        if at < t:                                                             # the padded tail
            tails += 1
            assert (s["input_ids"][at:] == packed.pad_id).all() and (s["labels"][at:] == -100).all()
            assert (seg[at:] == len(examples)).all()
            np.testing.assert_array_equal(s["positions"][at:], np.arange(t - at))
    assert tails > 0 and sorted(seen) == list(np.flatnonzero(lengths >= 2))
    assert len(packed) < len(rows) and packed.stats["fill_rate"] > packed.stats["padded_fill_rate"]
    assert packed.epoch_samples == len(packed) and sorted(packed.shuffled(1, 0)) == list(range(len(packed)))
    assert not np.array_equal(packed.shuffled(1, 0), packed.shuffled(1, 1))
    clone = pickle.loads(pickle.dumps(packed))
    assert clone._maps == {} and len(pickle.dumps(packed)) < 4000
    assert all(torch.equal(a, b) for a, b in zip(clone[0].values(), packed[0].values()))


def test_rows_with_nothing_counted_are_skipped(tmp_path: Path, tiny_tokenizer) -> None:
    tokens, labels, _ = instruct_rows(tiny_tokenizer, PAIRS * 3, 40)
    labels[4] = IGNORE_INDEX
    root = _write_shards(tmp_path, tiny_tokenizer, 40, {"data00": ("val", tokens[:2], labels[:2]),
                                                       "data01": ("train", tokens, labels)})
    rows, packed = _packed(root / "manifest.json")
    assert packed.stats["skipped"] == 1 and packed.stats["examples"] == len(rows) - 1
    assert 4 not in packed.plan.examples.tolist()


# ---- the datamodule -----------------------------------------------------------------------------------------
def _take(loader, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if n is not None and len(out) == n:
            break
    return out


def test_datamodule_packs_train_batches_only(prepared_instruct: Path, caplog) -> None:
    dm = LlamaDataModule(_cfg(prepared_instruct.parent, True))
    with caplog.at_level(logging.INFO, logger="llamalit.data.datamodule"):
        dm.setup("fit")
    stats = dm.packing_stats
    assert stats["enabled"] and stats["packed_rows"] < stats["rows"] and "data.packing" in caplog.text
    assert stats["fill_rate"] > stats["padded_fill_rate"]
    loader = dm.train_dataloader()
    assert len(loader) == stats["packed_rows"] // 4
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "positions", "segments"} and batch["segments"].shape == (4, 255)
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"input_ids", "labels"}                                  # val/loss stays per row
    assert LlamaDataModule(_cfg(prepared_instruct.parent, False)).packing_stats == {"enabled": False}


@pytest.mark.parametrize("k", [2, 9])  # mid-epoch, and in the second epoch
def test_resume_with_packing_continues_the_stream(prepared_instruct: Path, k: int) -> None:
    config = _cfg(prepared_instruct.parent, True, batch_size=8)
    loader = _dm(config).train_dataloader()
    per_epoch = len(loader)
    straight = _take(loader) + _take(loader)
    assert k < 2 * per_epoch
    first = _dm(config)
    _take(first.train_dataloader(), k)
    state = first.state_dict()
    assert state["packed"] and state["epoch_samples"] == first.packing_stats["packed_rows"]
    resumed = _dm(config, seed=99)  # Lightning sets up before it restores the state; the plan follows the seed
    with pytest.warns(UserWarning, match="resuming the data stream of seed 1337"):
        resumed.load_state_dict(state)
    rest = _take(resumed.train_dataloader())
    if k < per_epoch:
        rest += _take(resumed.train_dataloader())
    assert len(rest) == 2 * per_epoch - k
    for got, want in zip(rest, straight[k:]):
        assert all(torch.equal(got[key], want[key]) for key in want)


def _dm(config: dict, seed: int = 1337) -> LlamaDataModule:
    dm = LlamaDataModule(config, seed=seed)
    dm.setup("fit")
    return dm


def test_packing_on_pretrain_data_is_an_error(prepared_pretrain: Path) -> None:
    with pytest.raises(ValueError, match="data.packing=true but .*manifest.json holds pretraining shards"):
        _dm(_cfg(prepared_pretrain.parent, True, kind="pretrain", seq_len=32))
    assert _dm(_cfg(prepared_pretrain.parent, None, kind="pretrain", seq_len=32)).packing_stats["enabled"] is False
    with pytest.raises(ValueError, match="data.packing='yes'"):
        LlamaDataModule(_cfg(prepared_pretrain.parent, "yes"))


def test_auto_packing_follows_the_trainer_device(prepared_instruct: Path) -> None:
    import lightning as L

    dm = _dm(_cfg(prepared_instruct.parent, None))
    assert not dm.packing_enabled and dm.packing_stats == {"enabled": False}   # no Trainer: off
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert not dm.packing_enabled                                              # a CPU Trainer: off
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
                                 global_rank=0, world_size=1)
    batch = next(iter(dm.train_dataloader()))   # set up before the Trainer (train.py does): rebuilt, packed
    assert dm.packing_enabled and "segments" in batch and dm.packing_stats["enabled"]


def test_lengths_are_cached_beside_the_shards_until_a_label_file_changes(prepared_instruct: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import shutil

    from llamalit.data import packing

    data = tmp_path / "data"
    shutil.copytree(prepared_instruct.parent, data)
    rows, _ = _packed(data / prepared_instruct.name)
    cache = data / "lengths_train.npz"
    first = packing.cached_split_lengths(rows, cache)
    assert cache.is_file() and np.array_equal(first, split_lengths(rows))

    calls = []
    real = packing.split_lengths
    monkeypatch.setattr(packing, "split_lengths", lambda r: calls.append(1) or real(r))
    assert np.array_equal(packing.cached_split_lengths(rows, cache), first) and not calls  # reused

    labels = rows.shards[0].labels
    values = np.fromfile(labels, dtype=np.int32)
    values[: rows.row_len] = IGNORE_INDEX  # the first row loses every counted label
    values.tofile(labels)
    again = packing.cached_split_lengths(rows, cache)
    assert calls == [1] and again[0] == 0 and np.array_equal(again[1:], first[1:])  # recomputed, not stale

    blocked = tmp_path / "a_file"  # a cache that cannot be written (its "directory" is a file): no error
    blocked.write_text("")
    assert np.array_equal(packing.cached_split_lengths(rows, blocked / "lengths.npz"), again)
