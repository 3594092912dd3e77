"""Atomic writes: all or nothing, with the usual permissions."""

from __future__ import annotations

import os

import pytest
import torch

from llamalit.checkpoints.common import save_tensors
from llamalit.utils.fileio import atomic_path, atomic_write_json


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("interrupted")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_json(tmp_path / "a.json", {})
    save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    for name in ("a.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
