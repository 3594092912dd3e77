"""A 2 x 2 CPU sweep, as the user types it: ``python train.py -m experiment=demo_lora lora.rank=2,4 lora.alpha=1,8``.

Tiny overrides are added (and kept out of the job directory names); the base model is written first where
``demo_lora`` looks for it (``paths.models_dir/demo``). wandb runs offline: each job must be its own run
(``wandb.finish`` per job), all in the sweep's group, named by its overrides. The sweep directory ends with
``sweep_summary.csv`` (one row per job) and ``sweep_heatmap.png``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import llamalit.cli
from llamalit.checkpoints.native import save_model
from llamalit.data.datamodule import LlamaDataModule
from llamalit.model.llama import Llama, ModelConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = {"trainer.accelerator": "cpu", "trainer.max_steps": "4", "trainer.val_check_interval": "4",
        "trainer.limit_val_batches": "1", "trainer.log_every_n_steps": "2", "trainer.enable_model_summary": "false",
        "data.n_shards": "3", "data.stories_per_shard": "60", "data.tokenizer": "train:384",
        "data.batch_size": "4", "data.num_workers": "1", "data.loader_workers": "0",
        "evaluation.adherence_n": "2", "evaluation.max_new_tokens": "16", "callbacks.samples.max_new_tokens": "8",
        "optim.lr": "2e-2", "optim.warmup_steps": "1"}
GRID = [(2, 1), (2, 8), (4, 1), (4, 8)]


def wandb_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_two_by_two_lora_sweep(tmp_path):
    cache, sweep_dir = tmp_path / "cache", tmp_path / "multirun" / "sweep-2x2"
    tiny = [f"{k}={v}" for k, v in TINY.items()] + [f"paths.cache_dir={cache}"]
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_lora", *tiny, f"run_dir={tmp_path}"],
                      return_hydra_config=True)
    dm = LlamaDataModule(cfg.data, cache_dir=cache, seed=cfg.seed)
    dm.prepare_data()  # the jobs find these shards; the base must share their tokenizer
    torch.manual_seed(0)
    save_model(Llama(ModelConfig.preset("tiny", vocab_size=dm.vocab_size)), str(cfg.init_from))
    exclude = [*cfg.hydra.job.config.override_dirname.exclude_keys, *TINY]

    cmd = [sys.executable, str(REPO / "train.py"), "-m", "experiment=demo_lora", "lora.rank=2,4",
           "lora.alpha=1,8", "logger=wandb", *tiny, f"hydra.sweep.dir={sweep_dir}",
           f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run_dirs = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file())
    assert [p.name for p in run_dirs] == [f"{i}_lora.alpha={a},lora.rank={r}" for i, (r, a) in enumerate(GRID)]
    summaries = [json.loads((p / "summary.json").read_text()) for p in run_dirs]
    assert [(s["lora"]["rank"], s["lora"]["alpha"]) for s in summaries] == GRID
    assert all(s["step"] == 4 and s["val/loss"] is not None for s in summaries)
    assert all((p / "adapter_model.safetensors").is_file() and not (p / "model.safetensors").exists() for p in run_dirs)
    assert summaries[0]["trainable_params"] * 2 == summaries[2]["trainable_params"]  # rank 4 = twice rank 2

    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {"rank", "alpha", "trainable_params", "val_loss", "adherence", "tokens_per_s"} <= set(rows[0])
    assert [(int(r["rank"]), int(r["alpha"])) for r in rows] == GRID
    for row, s in zip(rows, summaries):
        assert float(row["val_loss"]) == s["val/loss"] and int(row["trainable_params"]) == s["trainable_params"]
        assert row["adherence"] != "" and float(row["tokens_per_s"]) > 0
    assert (sweep_dir / "sweep_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One offline wandb run per job, all in the sweep's group, named by the job's overrides.
    group = f"demo_lora-{sweep_dir.name}".encode()
    for (rank, alpha), run_dir in zip(GRID, run_dirs):
        files = wandb_run_files(run_dir)
        assert len(files) == 1, files  # its own run, not one shared with the previous job
        data = files[0].read_bytes()
        assert group in data
        assert f"demo_lora-lora.rank={rank}-lora.alpha={alpha}".encode() in data
    run_ids = {f.parent.name.rsplit("-", 1)[-1] for d in run_dirs for f in wandb_run_files(d)}
    assert len(run_ids) == 4
    summary_runs = wandb_run_files(sweep_dir)
    assert len(summary_runs) == 1 and group + b"-summary" in summary_runs[0].read_bytes()
