"""Hydra's own mistakes (an unknown option or key, a bad override, an unwritable run directory) and a truncated
``ckpt_path`` end in one ``error:`` line, through the real commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled", "HOME": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and lines[1:] == ["(HYDRA_FULL_ERROR=1 shows the traceback)"], proc.stderr
    assert proc.stdout == "", proc.stdout
    return lines[0]


@pytest.mark.parametrize("script, args, expected", [
    ("train.py", ["model=nope"], "Could not find 'model/nope'; the options are: hf, stories110m, stories15m, "
                                 "stories260k, stories42m, tiny"),
    ("train.py", ["experiment=nope"], "Could not find 'experiment/nope'; the options are: alpaca_qlora, demo,"),
    ("train.py", ["model.bogus=1"], "model.bogus: no such key (to add one, prefix it with +: +model.bogus=...); "
                                    "the keys under model are: quantize, gradient_checkpointing, dim,"),
    ("train.py", ["bogus=1"], "bogus: no such key (to add one, prefix it with +: +bogus=...); the keys at the top "
                              "are: experiment_name, model,"),
    ("train.py", ["lora.rank=2,4"], "Ambiguous value for argument 'lora.rank=2,4'"),
    ("generate.py", ["bogus=1"], "bogus: no such key"),
    ("scripts/export.py", ["bogus=1"], "bogus: no such key"),
    ("scripts/prepare.py", ["data=nope"], "Could not find 'data/nope'; the options are: alpaca, dolly,"),
    ("scripts/evaluate.py", ["bogus=1"], "bogus: no such key"),
    ("chat.py", ["bogus=1"], "bogus: no such key"),
    ("serve.py", ["bogus=1"], "bogus: no such key"),
])
def test_hydra_mistakes_are_one_line(tmp_path, script, args, expected):
    line = one_line(cli(tmp_path, script, *args, f"hydra.run.dir={tmp_path / 'run'}"))
    assert expected in line, line


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        line = one_line(cli(tmp_path, "train.py", "experiment=demo", f"hydra.run.dir={locked / 'run'}"))
    finally:
        locked.chmod(0o700)
    assert f"cannot write the run directory: {locked / 'run'}" in line and "hydra.run.dir=" in line


def test_a_run_directory_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line(cli(tmp_path, "train.py", "experiment=demo", f"hydra.run.dir={tmp_path / 'file' / 'run'}"))
    assert f"cannot write the run directory: {tmp_path / 'file'}" in line


def test_a_truncated_ckpt_path_is_named_first(tmp_path):
    import torch

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = one_line(cli(tmp_path, "train.py", "experiment=demo", f"ckpt_path={ckpt}",
                        f"hydra.run.dir={tmp_path / 'new'}"))
    assert f"ckpt_path={ckpt} is a truncated training checkpoint" in line, line
