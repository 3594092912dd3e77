"""What a user reads at every run: the final samples once (not again when the best checkpoint is validated), and
a steady-state tokens/s (warm-up steps excluded) in summary.json and the sweep table."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

import llamalit.cli
from llamalit.training import run
from llamalit.training.sweep import COLUMNS, collect_summaries

BUILD_CALLBACKS = run.build_callbacks
COMMON = ["experiment=demo", "model=tiny", "logger=none", "trainer.enable_progress_bar=false",
          "callbacks.progress_bar=null", "data.n_shards=3", "data.stories_per_shard=60", "data.tokenizer=train:384",
          "data.batch_size=8", "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=0",
          "callbacks.samples.max_new_tokens=2", "trainer.max_steps=8", "trainer.val_check_interval=8",
          "trainer.limit_val_batches=1", "optim.warmup_steps=2", "export_dir=null"]
SLOW_FIRST_STEP_S = 1.5

pytestmark = pytest.mark.usefixtures("one_thread")


class SlowFirstStep(L.Callback):
    """The first optimizer step takes SLOW_FIRST_STEP_S longer, as compiling makes it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            time.sleep(SLOW_FIRST_STEP_S)


def test_samples_print_once_and_tokens_per_s_excludes_the_warm_up(monkeypatch, tmp_path, capsys):
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, f"paths.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'r'}"])
    monkeypatch.setattr(run, "build_callbacks", lambda c, **kw: [*BUILD_CALLBACKS(c, **kw), SlowFirstStep()])
    summary = run.train(cfg)
    out = capsys.readouterr().out
    n_prompts = len(cfg.callbacks.samples.prompts)
    assert out.count("[sample, step 8]") == n_prompts, out  # at the last validation, not again after it
    whole, steady = summary["tokens_per_s"], summary["tokens_per_s_steady"]
    # the slow first step counts in the whole run's rate, not in the steady one
    assert steady > 1.3 * whole, (whole, steady)
    assert summary["tokens_seen"] / steady < summary["tokens_seen"] / whole - SLOW_FIRST_STEP_S * 0.8


def test_the_sweep_table_has_the_steady_rate(tmp_path):
    job = tmp_path / "0_lora.rank=2"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps({"tokens_per_s": 10.0, "tokens_per_s_steady": 30.0, "step": 4}))
    (row,) = collect_summaries(tmp_path)
    assert "tokens_per_s_steady" in COLUMNS and row["tokens_per_s_steady"] == 30.0
