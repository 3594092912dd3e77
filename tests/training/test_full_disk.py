"""A full disk (here a file size limit, RLIMIT_FSIZE, as ``ulimit -f`` sets) ends training and export in one
``error:`` line naming the file being written, what was kept and how to resume; nothing is lost."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["experiment=demo", "model=tiny", "data.n_shards=3", "data.stories_per_shard=60", "data.tokenizer=train:384",
        "data.batch_size=8", "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=0",
        "callbacks.samples=null", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "optim.warmup_steps=2", "export_dir=null",
        "logger=csv"]


def run(cmd: list[str], cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited if limit else None)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 4 steps (checkpoints at step 4, model.safetensors exported)."""
    tmp = tmp_path_factory.mktemp("full_disk")
    done = run([sys.executable, str(ROOT / "train.py"), *ARGS, f"paths.cache_dir={tmp / 'cache'}",
                "trainer.max_steps=4", f"run_dir={tmp / 'run'}"], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_on_a_full_disk_names_the_file_and_the_kept_checkpoint(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = sha(last)
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, f"paths.cache_dir={trained.parent / 'cache'}",
           "trainer.max_steps=8", f"ckpt_path={last}", f"run_dir={tmp_path / 'fresh'}"]
    line = one_error_line(run(cmd, tmp_path, limit=last.stat().st_size // 2))
    assert f"{run_dir}/checkpoints/step000008" in line and "file size limit" in line
    assert f"Kept: {last} (the last whole checkpoint, step 4)" in line and f"resume with ckpt_path={last}" in line
    assert sha(last) == before and not list(run_dir.glob("checkpoints/.*.tmp"))  # nothing lost, no temp left
    done = run(cmd, tmp_path)  # room again: the resume finishes
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 8


@pytest.mark.parametrize("fmt, written", [("hf", "model.safetensors"), ("llama2c", "model.bin")])
def test_export_on_a_full_disk_names_the_file(trained, tmp_path, fmt, written):
    out = tmp_path / "out"
    out.mkdir()
    (out / written).write_bytes(b"earlier export")  # an earlier file there survives the failed write
    cmd = [sys.executable, str(ROOT / "scripts" / "export.py"), f"ckpt={trained}", f"format={fmt}", f"out={out}",
           "overwrite=true", f"hydra.run.dir={tmp_path / 'h'}"]
    line = one_error_line(run(cmd, tmp_path, limit=(trained / "model.safetensors").stat().st_size // 2))
    assert f"{out}/{written}: not written" in line and "file size limit" in line, line
    assert (out / written).read_bytes() == b"earlier export"
