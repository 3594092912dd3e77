"""Bad training input fails early with one clear line: model shapes, init_from, resume checkpoints, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalit.model import ModelConfig
from llamalit.training.module import LlamaLitModule
from llamalit.training.run import check_resume, preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad, match", [({"n_heads": 0}, "n_heads=0"), ({"dim": -32}, "dim=-32"),
                                        ({"n_layers": 2.5}, "n_layers=2.5"), ({"dropout": 1.0}, "dropout=1.0")])
def test_model_config_names_the_bad_field(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", **bad)


def module_cfg(**model) -> dict:
    return {"model": ModelConfig.preset("tiny", **model).to_dict(), "init_from": None, "lora": {"enabled": False},
            "trainer": {"max_steps": 4}}


def save_ckpt(path: Path, cfg: dict) -> Path:
    module = LlamaLitModule(cfg)  # a Lightning checkpoint's parts that resuming reads
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"cfg": module.cfg}}, path)
    return path


def test_resume_of_another_shape_names_the_setting(tmp_path: Path) -> None:
    ckpt = save_ckpt(tmp_path / "last.ckpt", module_cfg(dim=64))
    check_resume(str(ckpt), LlamaLitModule(module_cfg(dim=64)))  # the same shape resumes
    with pytest.raises(ValueError, match=r"does not fit.*model\.dim=64 \(this run: 32\)"):
        check_resume(str(ckpt), LlamaLitModule(module_cfg()))


def test_resume_from_a_non_checkpoint_says_to_use_init_from(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a training checkpoint.*init_from="):
        check_resume(str(weights), LlamaLitModule(module_cfg()))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        check_resume(str(tmp_path / "other.pt"), LlamaLitModule(module_cfg()))


def test_preflight_checks_init_from_and_the_shape_before_any_data(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"init_from": str(tmp_path / "missing"), "model": ModelConfig.preset("tiny").to_dict()})
    with pytest.raises(FileNotFoundError, match="init_from=.*missing"):
        preflight(cfg)
    cfg.init_from = None
    cfg.model.n_kv_heads = 3
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        preflight(cfg)
    cfg.init_from = "https://example.com/model.bin"  # URLs are fetched later; the placeholder shape is not used
    preflight(cfg)


def test_train_cli_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "train.py", "experiment=demo", "model.n_heads=0", "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"})
    assert proc.returncode == 1
    assert "error: ModelConfig: n_heads=0 must be a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_copy_export_replaces_an_earlier_export_whole(tmp_path: Path) -> None:
    """export_dir (where demo_lora finds the demo model) never mixes two exports: a full model over an
    adapter leaves no adapter files that would be read instead."""
    from llamalit.checkpoints import load_checkpoint
    from llamalit.checkpoints.native import save_model
    from llamalit.model import Llama
    from llamalit.training.run import copy_export

    dest = tmp_path / "models" / "demo"
    dest.mkdir(parents=True)
    (dest / "adapter.safetensors").write_bytes(b"old")
    (dest / "adapter_config.json").write_text("{}")
    run = tmp_path / "run"
    model = Llama(ModelConfig.preset("tiny"))
    save_model(model, run)
    copy_export({"model": str(run / "model.safetensors")}, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "generation_config.json", "llamalit.json",
                                                      "model.safetensors"]
    torch.testing.assert_close(load_checkpoint(dest).state_dict(), model.state_dict())
