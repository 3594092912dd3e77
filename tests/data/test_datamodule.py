"""LlamaDataModule and the shard datasets, on shards + manifest written here with numpy (CONTRACT.md layout)."""

from __future__ import annotations

import json
import pickle
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llamalit.data.datamodule import LlamaDataModule
from llamalit.data.datasets import read_manifest

VOCAB = 4096
EOS, BOS, PAD = 2, 1, 3


# ---- helpers: write shards + manifest the way the preparation does ---------------------------------------
def write_manifest(root: Path, kind: str, shards: list[dict], seq_len: int | None, **extra) -> Path:
    manifest = {"format": "llamalit-shards/1", "kind": kind, "seq_len": seq_len, "ignore_index": -100,
                "pad_id": PAD, "tokenizer": {"path": "tok.model", "sha256": "0" * 64, "vocab_size": VOCAB,
                                             "bos_id": BOS, "eos_id": EOS}, "shards": shards}
    manifest.update(extra)
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def write_pretrain(root: Path, lengths: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """Flat shards; shard i holds tokens 1000*i, 1000*i + 1, ... so a window's origin is readable."""
    root.mkdir(parents=True, exist_ok=True)
    arrays, specs = {}, []
    for i, (name, (split, n)) in enumerate(lengths.items()):
        arr = (1000 * i + np.arange(n)).astype(np.uint16)
        arr.tofile(root / f"{name}.bin")
        arrays[name] = arr
        specs.append({"split": split, "source": f"{name}.json", "tokens": f"{name}.bin", "labels": None,
                      "token_dtype": "uint16", "label_dtype": "int32", "rows": None, "n_tokens": n, "dropped": 0})
    write_manifest(root, "pretrain", specs, None)
    return arrays


def instruct_rows(rows: int, seq_len: int, first_id: int, rng: np.random.Generator,
                  ignore: int = -100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of prompt + BOS + story + EOS + padding; returns tokens, labels and the prompt length of each row."""
    tokens = np.full((rows, seq_len), PAD, dtype=np.uint16)
    labels = np.full((rows, seq_len), ignore, dtype=np.int32)
    prompt_lens = rng.integers(2, seq_len // 3, size=rows)
    for r, p in enumerate(prompt_lens):
        story = rng.integers(3, seq_len - p - 2)
        body = [BOS] + list(first_id + r * 7 + np.arange(story) % 500) + [EOS]
        tokens[r, :p] = 100 + np.arange(p)
        tokens[r, p : p + len(body)] = body
        labels[r, p : p + len(body)] = body
    return tokens, labels, prompt_lens


def write_instruct(root: Path, shards: dict[str, tuple[str, int]], seq_len: int, ignore: int = -100) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data, specs = {}, []
    for i, (name, (split, rows)) in enumerate(shards.items()):
        tokens, labels, prompts = instruct_rows(rows, seq_len, 1000 * (i + 1), rng, ignore)
        tokens.tofile(root / f"{name}.tokens.bin")
        labels.tofile(root / f"{name}.labels.bin")
        data[name] = (tokens, labels, prompts)
        specs.append({"split": split, "source": f"{name}.json", "tokens": f"{name}.tokens.bin",
                      "labels": f"{name}.labels.bin", "token_dtype": "uint16", "label_dtype": "int32",
                      "rows": rows, "n_tokens": int(tokens.size), "dropped": 1})
    write_manifest(root, "instruct", specs, seq_len, ignore_index=ignore)
    return data


def cfg(root: Path, kind: str, seq_len: int, batch_size: int = 4, workers: int = 0) -> dict:
    return {"name": "t", "kind": kind, "source": None, "tokenizer": None, "dir": str(root), "seq_len": seq_len,
            "val_shards": 1, "num_workers": 1, "batch_size": batch_size, "loader_workers": workers,
            "packing": False}


def ready(config: dict, seed: int = 1337) -> LlamaDataModule:
    dm = LlamaDataModule(config, seed=seed)
    dm.setup("fit")
    return dm


def take(loader, n: int | None = None) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch["input_ids"].clone())
        if n is not None and len(out) == n:
            break
    return out


@pytest.fixture
def pretrain_dir(tmp_path: Path) -> Path:
    # val shard first (as data00 is), two train shards of different length.
    write_pretrain(tmp_path / "pt", {"data00": ("val", 200), "data01": ("train", 330), "data02": ("train", 171)})
    return tmp_path / "pt"


# ---- datasets ---------------------------------------------------------------------------------------------
def test_pretrain_batches_are_shifted_windows_inside_one_shard(pretrain_dir: Path) -> None:
    dm = ready(cfg(pretrain_dir, "pretrain", 16, batch_size=4))
    assert (dm.seq_len, dm.vocab_size, dm.pad_id) == (16, VOCAB, PAD)
    assert dm.tokenizer_path == pretrain_dir / "tok.model"
    # epoch = windows that cover the train tokens once: (330 - 1) // 16 + (171 - 1) // 16 = 20 + 10
    loader = dm.train_dataloader()
    assert len(loader) == 30 // 4
    batches = list(loader)
    assert len(batches) == 7
    for b in batches:
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
        assert b["input_ids"].shape == b["labels"].shape == (4, 16)
        x, y = b["input_ids"], b["labels"]
        assert torch.equal(x[:, 1:], y[:, :-1])                     # y is x shifted by one
        assert torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.equal(torch.diff(x, dim=1), torch.ones(4, 15, dtype=torch.long))  # contiguous: one shard
        assert ((x // 1000) != 0).all()                             # never the val shard (ids 0..199)
    starts = torch.cat([b["input_ids"][:, 0] for b in batches])
    assert len(set(starts.tolist())) == len(starts)                 # no window twice in an epoch
    assert not all(int(s) % 1000 % 16 == 0 for s in starts)        # random offsets, not a fixed grid


def test_val_split_is_the_ordered_windows_of_the_val_shards_only(pretrain_dir: Path) -> None:
    dm = ready(cfg(pretrain_dir, "pretrain", 16, batch_size=5))
    batches = list(dm.val_dataloader())
    x = torch.cat([b["input_ids"] for b in batches])
    assert x.shape == ((200 - 1) // 16, 16)                          # 12 windows, last batch partial
    assert torch.equal(x[:, 0], torch.arange(12) * 16)             # non-overlapping, in order, from data00
    assert int(torch.cat([b["labels"] for b in batches]).max()) <= 199
    assert list(dm.val_dataloader())[0]["input_ids"].equal(batches[0]["input_ids"])  # same every time


@pytest.mark.parametrize("ignore", [-100, -1])
def test_instruct_rows_shift_and_ignore_prompt_and_padding(tmp_path: Path, ignore: int) -> None:
    data = write_instruct(tmp_path, {"data00": ("val", 5), "data01": ("train", 9), "data02": ("train", 7)},
                          seq_len=24, ignore=ignore)
    dm = ready(cfg(tmp_path, "instruct", 24, batch_size=1))
    assert dm.seq_len == 23                                          # model input = row length - 1
    seen = 0
    for b in dm.train_dataloader():
        x, y = b["input_ids"][0].numpy(), b["labels"][0].numpy()
        assert x.shape == y.shape == (23,)
        name, r = next((n, r) for n, (t, _, _) in data.items() for r in range(len(t)) if (t[r, :-1] == x).all())
        tokens, labels, prompts = data[name]
        assert name != "data00"
        np.testing.assert_array_equal(x, tokens[r, :-1])
        counted = labels[r, 1:] != ignore
        np.testing.assert_array_equal(y[counted], labels[r, 1:][counted])
        assert (y[~counted] == -100).all()                           # ignore index normalised to -100
        assert not counted[: prompts[r] - 1].any()                  # prompt targets not counted
        assert y[prompts[r] - 1] == BOS                             # first counted target: BOS after the prompt
        end = prompts[r] - 1 + int(counted.sum())
        assert x[end] == EOS and y[end - 1] == EOS                 # the story ends with EOS ...
        assert (x[end + 1 :] == PAD).all() and (y[end:] == -100).all()  # ... then padding: a real id, not counted
        seen += 1
    assert seen == 16
    vals = np.concatenate([b["input_ids"].numpy() for b in dm.val_dataloader()])
    np.testing.assert_array_equal(vals, data["data00"][0][:, :-1])   # val = the val shard's rows in order


def test_dataset_pickles_without_its_memmaps(pretrain_dir: Path) -> None:
    dm = ready(cfg(pretrain_dir, "pretrain", 16))
    ds = dm._train
    first = ds[5]
    assert ds._maps                                                  # opened by the read
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {} and len(pickle.dumps(ds)) < 2000
    assert torch.equal(clone[5]["input_ids"], first["input_ids"])


# ---- epochs, ranks, determinism ---------------------------------------------------------------------------
def test_epochs_reshuffle_deterministically(tmp_path: Path) -> None:
    write_instruct(tmp_path, {"data00": ("val", 3), "data01": ("train", 24)}, seq_len=12)
    config = cfg(tmp_path, "instruct", 12, batch_size=4)
    loader = ready(config).train_dataloader()
    epoch0, epoch1 = torch.cat(take(loader)), torch.cat(take(loader))
    assert len(loader) == 6 and epoch0.shape == (24, 11)
    assert not torch.equal(epoch0, epoch1)                           # a new epoch reshuffles ...
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch0) == key(epoch1)                                # ... the same rows
    again = ready(config).train_dataloader()
    assert torch.equal(torch.cat(take(again)), epoch0)               # same seed: same stream
    other = ready(config, seed=7).train_dataloader()
    assert not torch.equal(torch.cat(take(other)), epoch0)


@pytest.mark.parametrize("kind", ["pretrain", "instruct"])
def test_two_ranks_read_disjoint_halves_of_the_stream(tmp_path: Path, kind: str) -> None:
    if kind == "pretrain":
        write_pretrain(tmp_path, {"data00": ("val", 100), "data01": ("train", 800)})
    else:
        write_instruct(tmp_path, {"data00": ("val", 6), "data01": ("train", 40)}, seq_len=12)
    config = cfg(tmp_path, kind, 12 if kind == "instruct" else 16, batch_size=3)
    per_rank, val = [], []
    for rank in (0, 1):
        dm = ready(config)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what DDP gives each rank
        loader = dm.train_dataloader()
        per_rank.append([tuple(r) for b in loader for r in b["input_ids"].tolist()])
        val.append([tuple(r) for b in dm.val_dataloader() for r in b["input_ids"].tolist()])
        assert len(loader) == (49 if kind == "pretrain" else 40) // 6
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])                 # never the same sample on two ranks
    assert not set(val[0]) & set(val[1]) and len(val[0]) == len(val[1])
    single = [tuple(r) for b in ready(cfg(tmp_path, kind, config["seq_len"], 6)).train_dataloader()
              for r in b["input_ids"].tolist()]
    assert single[0::2] == per_rank[0] and single[1::2] == per_rank[1]  # together: the one-process stream


# ---- resume -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [3, 7])
def test_restored_loader_continues_after_the_consumed_batches(pretrain_dir: Path, workers: int, k: int,
                                                              tmp_path: Path) -> None:
    config = cfg(pretrain_dir, "pretrain", 16, batch_size=4, workers=workers)
    loader = ready(config).train_dataloader()
    straight = take(loader) + take(loader)                           # two epochs of 7 batches
    assert len(straight) == 14

    first = ready(config)
    stopped = first.train_dataloader()
    assert torch.equal(torch.cat(take(stopped, k)), torch.cat(straight[:k]))
    state = first.state_dict()
    assert state["epoch"] == k // 7 and state["samples_in_epoch"] == 4 * (k % 7)
    torch.save({"dm": state}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["dm"]  # plain types: loads with weights_only

    resumed = LlamaDataModule(config)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    assert len(loader) == 7                                          # the epoch length stays the same
    rest = take(loader)                                              # the rest of the epoch, then a full one
    if k < 7:
        rest += take(loader)
    assert len(rest) == 14 - k
    for got, want in zip(rest, straight[k:]):
        assert torch.equal(got, want)
    del loader, stopped


class _Recorder:
    """A LightningModule factory that records the input_ids of every training batch."""

    @staticmethod
    def build():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[torch.Tensor] = []

            def training_step(self, batch, batch_idx):
                self.seen.append(batch["input_ids"].clone())
                return (self.w - batch["input_ids"].float().mean()).pow(2).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=1e-6)

        return Recorder()


def _trainer(tmp_path: Path, max_steps: int, limit: int | None, callbacks=()):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=list(callbacks),
                     enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                     limit_train_batches=limit, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


@pytest.mark.parametrize("limit", [None, 3])  # Lightning epochs = data epochs, or shorter than them
def test_lightning_resume_from_a_mid_epoch_checkpoint_continues_the_stream(pretrain_dir: Path, tmp_path: Path,
                                                                            limit: int | None) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    config = cfg(pretrain_dir, "pretrain", 16, batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=9, save_top_k=-1, filename="{step}")
    straight = _Recorder.build()
    _trainer(tmp_path, 12, limit, [ckpt]).fit(straight, datamodule=LlamaDataModule(config))
    assert len(straight.seen) == 12                                  # 7 batches a data epoch: crosses into epoch 1
    saved = torch.load(tmp_path / "ck" / "step=9.ckpt", weights_only=True)
    assert saved["LlamaDataModule"]["epoch"] == 1 and saved["LlamaDataModule"]["samples_in_epoch"] == 8
    fresh = ready(config).train_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(straight.seen, take(fresh) + take(fresh)))  # the plain stream

    resumed = _Recorder.build()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        _trainer(tmp_path, 12, limit).fit(resumed, datamodule=LlamaDataModule(config),
                                          ckpt_path=tmp_path / "ck" / "step=9.ckpt")
    assert len(resumed.seen) == 3
    for got, want in zip(resumed.seen, straight.seen[9:]):
        assert torch.equal(got, want)


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_manifest_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json does not exist.*llamalit-prepare"):
        ready(cfg(tmp_path / "nothing", "pretrain", 16))


@pytest.mark.parametrize("edit, message", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: {**m, "format": "other/9"}, "format is 'other/9'"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "missing field 'shards'"),
    (lambda m: {**m, "shards": [{k: v for k, v in m["shards"][0].items() if k != "tokens"}]},
     r"missing field 'shards\[0\]\.tokens'"),
    (lambda m: {**m, "tokenizer": {"path": "x"}}, r"missing field 'tokenizer\.vocab_size'"),
])
def test_malformed_manifest_names_the_field(pretrain_dir: Path, edit, message: str) -> None:
    path = pretrain_dir / "manifest.json"
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ValueError, match=message) as err:
        ready(cfg(pretrain_dir, "pretrain", 16))
    assert str(path) in str(err.value)


def test_short_or_missing_shard_names_the_file(pretrain_dir: Path, tmp_path: Path) -> None:
    shard = pretrain_dir / "data02.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"data02\.bin holds 166 uint16 values .* says 171.*shorter"):
        ready(cfg(pretrain_dir, "pretrain", 16))
    write_instruct(tmp_path / "in", {"data00": ("val", 2), "data01": ("train", 4)}, seq_len=10)
    (tmp_path / "in" / "data01.labels.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"data01\.labels\.bin is missing"):
        ready(cfg(tmp_path / "in", "instruct", 10))


def test_seq_len_longer_than_the_rows_or_shards(tmp_path: Path) -> None:
    write_instruct(tmp_path / "in", {"data00": ("val", 2), "data01": ("train", 4)}, seq_len=10)
    with pytest.raises(ValueError, match=r"data\.seq_len=32 but .* rows of 10 tokens"):
        ready(cfg(tmp_path / "in", "instruct", 32))
    write_pretrain(tmp_path / "pt", {"data00": ("val", 300), "data01": ("train", 40), "data02": ("train", 50)})
    with pytest.raises(ValueError, match=r"train split .* no windows of seq_len \+ 1 = 65 .*data01\.bin: 40"):
        ready(cfg(tmp_path / "pt", "pretrain", 64))
    with pytest.raises(ValueError, match="fewer than batch_size 64"):
        ready(cfg(tmp_path / "pt", "pretrain", 8, batch_size=64)).train_dataloader()


def test_token_ids_beyond_the_vocab_are_reported(pretrain_dir: Path) -> None:
    manifest = json.loads((pretrain_dir / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 1100                        # data02 holds ids 2000..
    (pretrain_dir / "manifest.json").write_text(json.dumps(manifest))
    ds = ready(cfg(pretrain_dir, "pretrain", 16))._train
    with pytest.raises(ValueError, match=r"data02\.bin: token id 2\d+ .* >= vocab_size 1100"):
        ds[len(ds) - 1]


# ---- prepare_data -------------------------------------------------------------------------------------------
def test_prepare_data_runs_the_preparation_only_when_needed(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def prepare(data_cfg, cache_dir):
        calls.append((dict(data_cfg), Path(cache_dir)))
        write_pretrain(Path(data_cfg["dir"]), {"data00": ("val", 100), "data01": ("train", 300)})
        return Path(data_cfg["dir"]) / "manifest.json"

    fake = types.ModuleType("llamalit.data.prepare")
    fake.prepare = prepare
    monkeypatch.setitem(sys.modules, "llamalit.data.prepare", fake)
    config = cfg(tmp_path / "shards", "pretrain", 16)
    dm = LlamaDataModule(config, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    assert calls == [(config, tmp_path / "cache")]
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 299 // 16 // 4
    LlamaDataModule(config, cache_dir=tmp_path / "cache").prepare_data()
    assert len(calls) == 1                                           # shards present: nothing to do
    (tmp_path / "shards" / "data01.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match=r"data01\.bin holds 1 uint16 values"):  # damaged after preparing: said
        LlamaDataModule(config, cache_dir=tmp_path / "cache").prepare_data()
    (tmp_path / "shards" / "manifest.json").unlink()                 # no manifest (an interrupted prepare)
    LlamaDataModule(config, cache_dir=tmp_path / "cache").prepare_data()
    assert len(calls) == 2                                           # prepared again
    assert read_manifest(tmp_path / "shards")["kind"] == "pretrain"


def test_one_manifest_reader_for_the_datasets_and_the_preparation(pretrain_dir: Path, tmp_path: Path) -> None:
    from llamalit.data import prepare

    assert read_manifest is prepare.read_manifest                     # the datasets re-export the one reader
    with pytest.raises(prepare.ManifestMissing) as err:
        read_manifest(tmp_path / "nothing")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, prepare.ManifestError)
    m = prepare.load_manifest(pretrain_dir, verify=False)            # read_manifest + absolute paths
    assert m["dir"] == str(pretrain_dir) and m["shards"][1]["tokens"] == str(pretrain_dir / "data01.bin")
    path = pretrain_dir / "manifest.json"
    path.write_text(path.read_text().replace('"n_tokens": 330', '"n_tokens": "330"'))
    with pytest.raises(prepare.ManifestError, match=r"field 'shards\[1\]\.n_tokens' should be int"):
        prepare.load_manifest(pretrain_dir, verify=False)            # the same validation for both names
