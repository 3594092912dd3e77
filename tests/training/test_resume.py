"""Exact resume: N optimizer steps straight == N/2 steps, a crash, then ``ckpt_path=last`` (or a path) for the rest.

Dropout is on (so the RNG state matters), gradients accumulate over 2 micro-batches, the checkpoint is the
one ``ModelCheckpoint`` writes at the validation half way, and the data stream crosses an epoch boundary
after the resume. Per-micro-batch training losses, the final weights and the summary must match.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import llamalit.cli
from llamalit.checkpoints.native import save_model
from llamalit.data.datamodule import LlamaDataModule
from llamalit.model.llama import Llama, ModelConfig
from llamalit.training import run

BUILD_CALLBACKS = run.build_callbacks
CONF_DIR = Path(llamalit.cli.CONF_DIR)
STEPS = 8  # optimizer steps; 2 micro-batches each; 15 micro-batches per epoch (120 rows / 8)
COMMON = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
          "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
          "data.n_shards=3", "data.stories_per_shard=60", "data.tokenizer=train:384", "data.batch_size=8",
          "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=0",
          "callbacks.samples.max_new_tokens=4", f"trainer.max_steps={STEPS}", "trainer.accumulate_grad_batches=2",
          f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
          "optim.warmup_steps=2", "model.dropout=0.1"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Preempted(RuntimeError):
    pass


class LossRecorder(L.Callback):
    """(optimizer step, batch index, loss) of every training micro-batch; optionally dies at a step."""

    def __init__(self, crash_at_step: int | None = None):
        self.crash_at_step = crash_at_step
        self.losses: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_at_step:
            raise Preempted(f"killed before step {trainer.global_step}")
        self._step = trainer.global_step  # the optimizer step this micro-batch belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((self._step, batch_idx, float(outputs["loss"])))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def train_recording(monkeypatch, cfg, recorder: LossRecorder) -> dict:
    """``run.train(cfg)`` with ``recorder`` added to the callbacks the config builds."""
    monkeypatch.setattr(run, "build_callbacks", lambda c, **kw: [*BUILD_CALLBACKS(c, **kw), recorder])
    return run.train(cfg)


def straight_vs_resumed(monkeypatch, tmp_path, overrides: list[str], resume_with_path: bool):
    cfg = lambda run_dir, *more: compose_cfg([*overrides, f"run_dir={run_dir}", *more])  # noqa: E731
    straight = LossRecorder()
    s_summary = train_recording(monkeypatch, cfg(tmp_path / "a" / "straight"), straight)

    first = LossRecorder(crash_at_step=STEPS // 2)
    with pytest.raises(Preempted):
        train_recording(monkeypatch, cfg(tmp_path / "b" / "first"), first)
    last = tmp_path / "b" / "first" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == STEPS // 2 and "rng_states" in ckpt

    second = LossRecorder()
    r_summary = train_recording(monkeypatch, cfg(tmp_path / "b" / "second",
                                                 f"ckpt_path={last if resume_with_path else 'last'}"), second)
    return straight, first, second, s_summary, r_summary


def check_same(straight: LossRecorder, first: LossRecorder, second: LossRecorder, s_summary: dict,
               r_summary: dict) -> None:
    half = [x for x in straight.losses if x[0] < STEPS // 2]
    assert first.losses == half
    rest = straight.losses[len(half):]
    assert [x[:2] for x in second.losses] == [x[:2] for x in rest]  # same steps and in-epoch batch indices
    assert rest[-1][1] < rest[0][1]  # the stream crossed into the next epoch after the resume
    assert [x[2] for x in second.losses] == pytest.approx([x[2] for x in rest], rel=1e-6, abs=1e-7)
    for key in ("step", "tokens_seen", "vocab_size"):
        assert r_summary[key] == s_summary[key], key
    assert r_summary["val/loss"] == pytest.approx(s_summary["val/loss"], rel=1e-6)


def test_resume_from_last_continues_exactly(monkeypatch, tmp_path):
    overrides = ["experiment=demo", "model=tiny", f"paths.cache_dir={tmp_path / 'cache'}", *COMMON,
                 "optim.lr=1e-2"]
    straight, first, second, s_sum, r_sum = straight_vs_resumed(monkeypatch, tmp_path, overrides, False)
    check_same(straight, first, second, s_sum, r_sum)
    a = load_file(str(tmp_path / "a" / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "first" / "model.safetensors"))  # the resume continued in its run dir
    assert not (tmp_path / "b" / "second").exists()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_resume_without_rng_state_diverges(monkeypatch, tmp_path):
    """The RNG restore is what makes dropout repeat: dropping it from the checkpoint changes the losses."""
    from llamalit.training.module import LlamaLitModule

    overrides = ["experiment=demo", "model=tiny", f"paths.cache_dir={tmp_path / 'cache'}", *COMMON,
                 "optim.lr=1e-2"]
    real = LlamaLitModule.on_save_checkpoint

    def without_rng(self, checkpoint: dict) -> None:
        real(self, checkpoint)
        checkpoint["rng_states"] = {}

    monkeypatch.setattr(LlamaLitModule, "on_save_checkpoint", without_rng)
    straight, first, second, _, _ = straight_vs_resumed(monkeypatch, tmp_path, overrides, True)
    rest = straight.losses[len(first.losses):]
    assert [x[:2] for x in second.losses] == [x[:2] for x in rest]
    assert [x[2] for x in second.losses] != pytest.approx([x[2] for x in rest], rel=1e-6, abs=1e-7)


def test_lora_run_resumes_exactly(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    overrides = ["experiment=demo_lora", f"paths.cache_dir={cache}", *COMMON, "optim.lr=2e-2", "lora.dropout=0.1"]
    base_cfg = compose_cfg([*overrides, f"run_dir={tmp_path}"])
    dm = LlamaDataModule(base_cfg.data, cache_dir=cache, seed=base_cfg.seed)
    dm.prepare_data()
    torch.manual_seed(0)
    save_model(Llama(ModelConfig.preset("tiny", vocab_size=dm.vocab_size, dropout=0.1)), str(base_cfg.init_from))
    straight, first, second, s_sum, r_sum = straight_vs_resumed(monkeypatch, tmp_path, overrides, True)
    check_same(straight, first, second, s_sum, r_sum)
    assert s_sum["trainable_params"] < s_sum["params"] / 10
    a = load_file(str(tmp_path / "a" / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "first" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # the adapters did train
    assert json.loads((tmp_path / "b" / "first" / "summary.json").read_text())["step"] == STEPS
    # The checkpoint holds the adapters only; resuming on another base is refused, naming init_from.
    last = tmp_path / "b" / "first" / "checkpoints" / "last.ckpt"
    assert all(k.endswith(("lora_A", "lora_B")) for k in torch.load(last, weights_only=True)["state_dict"])
    torch.manual_seed(1)
    save_model(Llama(ModelConfig.preset("tiny", vocab_size=dm.vocab_size, dropout=0.1)), str(base_cfg.init_from))
    with pytest.raises(ValueError, match="init_from=.*is not the base this checkpoint was trained on"):
        run.train(compose_cfg([*overrides, f"run_dir={tmp_path / 'c'}", f"ckpt_path={last}"]))


def test_resume_from_last_skips_a_truncated_last_ckpt(monkeypatch, tmp_path, caplog):
    """A last.ckpt cut short (a full disk while an older version wrote it) beside an intact step checkpoint:
    ``ckpt_path=last`` resumes from the newest readable one and says so."""
    overrides = ["experiment=demo", "model=tiny", f"paths.cache_dir={tmp_path / 'cache'}", *COMMON]
    first = LossRecorder(crash_at_step=STEPS // 2 + 1)  # after the validation at STEPS // 2 ...
    with pytest.raises(Preempted):
        train_recording(monkeypatch, compose_cfg([*overrides, f"trainer.val_check_interval={STEPS // 2 * 2}",
                                                  f"run_dir={tmp_path / 'runs' / 'first'}"]), first)
    ckpts = tmp_path / "runs" / "first" / "checkpoints"
    (step_ckpt,) = [p for p in ckpts.glob("step*.ckpt")]
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # ... and a torn last.ckpt after it
    with caplog.at_level("WARNING", logger="llamalit.training.run"):
        summary = train_recording(monkeypatch, compose_cfg([*overrides, f"run_dir={tmp_path / 'runs' / 'second'}",
                                                            "ckpt_path=last"]), LossRecorder())
    assert summary["step"] == STEPS
    assert any(f"{last} is not readable" in r.message and f"resuming from {step_ckpt}" in r.message
               for r in caplog.records), [r.message for r in caplog.records]


class FullDisk:
    """A file being written on a disk with ``room['left']`` bytes free: a write past that stores what fits and
    fails with ENOSPC, as a full disk does."""

    def __init__(self, f, room: dict) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self._room["left"]:
            self._f.write(data[: self._room["left"]])
            self._room["left"] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room["left"] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The checkpoint folder's disk fills up while a bigger checkpoint is written over last.ckpt: the write
    fails, and the previous checkpoint is still there, whole. Temp files elsewhere (/tmp on another filesystem,
    here /dev/shm when it is one) do not help: the bytes must still be copied onto the checkpoint's disk."""
    from llamalit.training.checkpoint_io import AtomicCheckpointIO

    io, folder = AtomicCheckpointIO(), tmp_path / "checkpoints"
    path = folder / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        monkeypatch.setattr(tempfile, "tempdir", str(shm))
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False, raising=False)  # copies go through write()
    room, real_open = {"left": path.stat().st_size // 2}, builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike))
        return FullDisk(f, room) if writes and Path(file).resolve().parent == folder.resolve() else f

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    try:
        with pytest.raises((OSError, RuntimeError)):  # torch reports the failed write as either
            io.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}, "global_step": 2}, path)
    finally:
        monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_through_the_atomic_writer(monkeypatch, tmp_path):
    from llamalit.training.checkpoint_io import AtomicCheckpointIO

    seen = []
    probe = type("Probe", (L.Callback,), {"on_train_start": lambda self, trainer, module: seen.append(
        type(trainer.strategy.checkpoint_io))})()
    overrides = ["experiment=demo", "model=tiny", f"paths.cache_dir={tmp_path / 'cache'}", *COMMON,
                 "trainer.max_steps=1", "trainer.limit_val_batches=0"]
    monkeypatch.setattr(run, "build_callbacks", lambda c, **kw: [*BUILD_CALLBACKS(c, **kw), probe])
    run.train(compose_cfg([*overrides, f"run_dir={tmp_path / 'run'}"]))
    assert seen == [AtomicCheckpointIO]


def test_a_run_resumed_mid_epoch_shows_its_total_and_eta(monkeypatch, tmp_path):
    """Lightning skips on_train_epoch_start when it resumes mid-epoch, where the bar gets its total: without
    it the bar shows neither a total nor an ETA."""
    from llamalit.training.callbacks import StepProgressBar

    overrides = ["experiment=demo", "model=tiny", f"paths.cache_dir={tmp_path / 'cache'}",
                 *[o for o in COMMON if "progress_bar" not in o], "trainer.enable_progress_bar=true",
                 "callbacks.progress_bar.refresh_steps=1"]
    with pytest.raises(Preempted):
        train_recording(monkeypatch, compose_cfg([*overrides, f"run_dir={tmp_path / 'r' / 'first'}"]),
                        LossRecorder(crash_at_step=STEPS // 2))
    bars = []

    class BarProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
            bars.append((bar.total, bar.n, bar.desc))

    train_recording(monkeypatch, compose_cfg([*overrides, f"run_dir={tmp_path / 'r' / 'second'}",
                                              "ckpt_path=last"]), BarProbe())
    total, n, desc = bars[0]
    done = STEPS // 2 * 2  # micro-batches of epoch 0 before the crash (2 a step)
    assert desc.startswith("Epoch 0") and isinstance(total, int) and done <= n < total  # mid-epoch, with a total
