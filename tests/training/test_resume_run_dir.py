"""A resumed run continues in its own run directory: one metrics.csv (appended), one wandb run (its id kept in
the run directory), one summary.json; tested with kill -9 mid-run through train.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
ARGS = ["experiment=demo", "model=tiny", "data.n_shards=3", "data.stories_per_shard=60", "data.tokenizer=train:384",
        "data.batch_size=8", "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=0",
        "callbacks.samples=null", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2", "export_dir=null"]


def train_py(tmp_path: Path, *more: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *ARGS, f"paths.cache_dir={tmp_path / 'cache'}", *more]


def env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
            "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}


def test_kill_9_and_resume_continue_in_one_run_directory(tmp_path):
    cmd = train_py(tmp_path, "logger=csv", f"trainer.max_steps={STEPS}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, last = time.time() + 240, None
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "outputs" / "demo").glob("*/checkpoints/last.ckpt"))
            if found:
                last = found[0]
                break
            time.sleep(0.05)
        assert last is not None, "no checkpoint appeared"
        proc.send_signal(signal.SIGKILL)  # kill -9 mid-run
        proc.wait(30)
    finally:
        proc.kill()
    run_dir = last.parent.parent
    killed_at = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 0 < killed_at < STEPS and not (run_dir / "summary.json").exists()
    time.sleep(1.1)  # Hydra's run directory names have 1 s resolution: a fresh one for the resume
    done = subprocess.run([*cmd, "ckpt_path=last"], cwd=tmp_path, env=env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "demo").iterdir()] == [run_dir.name]  # no second run dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["run_dir"] == str(run_dir.resolve())
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] >= STEPS - 2 and steps[0] <= 1  # one curve, no repeats
    resumes = list((run_dir / "resumes").iterdir())
    assert len(resumes) == 1 and (resumes[0] / ".hydra" / "overrides.yaml").is_file()
    assert "ckpt_path=last" in (resumes[0] / ".hydra" / "overrides.yaml").read_text()
    assert "resuming in the checkpoint's run directory" in (run_dir / "train.log").read_text()


def test_resume_keeps_the_wandb_run_and_offline_wandb_is_quiet(tmp_path):
    cmd = train_py(tmp_path, "logger=wandb", "logger.mode=offline", "trainer.max_steps=4")
    first = subprocess.run(cmd, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "demo").iterdir()
    run_id = (run_dir / "wandb_id").read_text().strip()
    time.sleep(1.1)
    second = subprocess.run([*cmd, "ckpt_path=last", "trainer.max_steps=8"], cwd=tmp_path, env=env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "demo").iterdir()] == [run_dir.name]
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)  # `wandb sync` joins them
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
    for out in (first, second):  # no wandb banner in offline mode
        wandb_lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("wandb:")]
        assert len(wandb_lines) <= 2, wandb_lines
