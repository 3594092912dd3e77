"""Bad training input fails early with one clear line: model shapes, init_from, resume checkpoints, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamalit.cli
from llamalit.model.llama import ModelConfig
from llamalit.training.module import LlamaLitModule
from llamalit.training.run import check_resume, preflight

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bad, match", [({"n_heads": 0}, "n_heads=0"), ({"dim": -32}, "dim=-32"),
                                        ({"n_layers": 2.5}, "n_layers=2.5"), ({"dropout": 1.0}, "dropout=1.0")])
def test_model_config_names_the_bad_field(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", **bad)


def tiny_module(lora: dict | None = None, **model) -> LlamaLitModule:
    return LlamaLitModule(ModelConfig.preset("tiny", **model), {}, lora)


def save_ckpt(path: Path, module: LlamaLitModule, old_style: bool = False) -> Path:
    """A Lightning checkpoint's parts that resuming reads; ``old_style``: hyper_parameters as versions before the
    typed module arguments wrote them (the whole run config under ``cfg``)."""
    hp = dict(module.hparams)
    if old_style:
        lora = {"enabled": True, **hp["lora_cfg"]} if hp["lora_cfg"] else {"enabled": False}
        hp = {"cfg": {"model": hp["model_cfg"], "lora": lora, "init_from": None, "trainer": {"max_steps": 4}}}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp}, path)
    return path


@pytest.mark.parametrize("old_style", [False, True])
def test_resume_of_another_shape_names_the_setting(tmp_path: Path, old_style: bool) -> None:
    ckpt = save_ckpt(tmp_path / "last.ckpt", tiny_module(dim=64), old_style)
    check_resume(str(ckpt), tiny_module(dim=64))  # the same shape resumes
    with pytest.raises(ValueError, match=r"does not fit.*model\.dim=64 \(this run: 32\)"):
        check_resume(str(ckpt), tiny_module())
    lora = {"enabled": True, "rank": 2, "alpha": 4.0, "targets": ["wq"]}
    ckpt = save_ckpt(tmp_path / "lora.ckpt", tiny_module(lora), old_style)
    with pytest.raises(ValueError, match=r"lora\.rank=2 \(this run: 4\)"):
        check_resume(str(ckpt), tiny_module({**lora, "rank": 4}))
    with pytest.raises(ValueError, match=r"lora\.enabled=True \(this run: False\)"):
        check_resume(str(ckpt), tiny_module())


def test_resume_from_a_non_checkpoint_says_to_use_init_from(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a training checkpoint.*init_from="):
        check_resume(str(weights), tiny_module())
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        check_resume(str(tmp_path / "other.pt"), tiny_module())


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
    from llamalit.model.llama import Llama
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


CONF_DIR = Path(llamalit.cli.CONF_DIR)
SMALL_DATA = ["data.n_shards=2", "data.stories_per_shard=60", "data.tokenizer=train:384", "data.num_workers=1",
              "logger=none", "callbacks.samples=null", "evaluation.adherence_n=0", "model=tiny"]


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("experiment, key, value, valid", [
    ("demo", "data.batch_size", 0, "an integer >= 1"), ("demo", "data.batch_size", -4, "an integer >= 1"),
    ("demo", "optim.lr", -1, "a number > 0"), ("demo_lora", "lora.rank", 0, "an integer >= 1"),
    ("demo", "trainer.max_steps", 0, "an integer >= 1 or -1"), ("demo", "optim.beta2", 1.0, r"a number in \[0, 1\)"),
    ("demo", "trainer.accumulate_grad_batches", 0, "an integer >= 1"), ("demo_lora", "lora.alpha", 0, "a number > 0"),
    ("demo", "evaluation.max_new_tokens", 0, "an integer >= 1"), ("demo", "data.loader_workers", -1, "an integer >= 0"),
])
def test_every_numeric_setting_is_checked_before_any_work(tmp_path, experiment, key, value, valid):
    from llamalit.training.run import train

    cfg = compose_train([f"experiment={experiment}", f"paths.cache_dir={tmp_path / 'cache'}",
                         f"run_dir={tmp_path / 'run'}", f"{key}={value}", *SMALL_DATA])
    with pytest.raises(ValueError, match=f"^{key}={value!r}: must be {valid}"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # nothing prepared, downloaded or published


def cli_env(home: Path) -> dict[str, str]:
    """A user's environment: HOME of its own, no LLAMALIT_CACHE (the default ~/.cache/llamalit is used)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMALIT_CACHE"}
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=0", "error: trainer.max_steps=0: must be an integer >= 1 or -1"),
    ("data.batch_size=0", "error: data.batch_size=0: must be an integer >= 1"),
])
def test_train_cli_refuses_a_bad_number_in_one_line_before_work(tmp_path, override, expected):
    proc = subprocess.run([sys.executable, "train.py", "experiment=demo", override, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=cli_env(tmp_path))
    assert proc.returncode == 1
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".cache" / "llamalit").exists()  # no data prepared, no models/demo published


def test_a_run_without_an_optimizer_step_publishes_nothing(tmp_path, monkeypatch):
    """Whatever made fit end without a step (here a fit that returns at once), the untrained weights are not
    exported, nor published where demo_lora looks for its base."""
    import lightning as L

    from llamalit.training.run import train

    models = tmp_path / "models" / "demo"
    cfg = compose_train(["experiment=demo", f"paths.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
                         f"export_dir={models}", "data.batch_size=4", *SMALL_DATA])
    with pytest.raises(ValueError, match="^trainer.limit_train_batches=0: trains nothing"):
        train(compose_train(["experiment=demo", f"paths.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'r'}",
                             "+trainer.limit_train_batches=0", *SMALL_DATA]))
    monkeypatch.setattr(L.Trainer, "fit", lambda self, *args, **kwargs: None)
    with pytest.raises(ValueError, match=f"no optimizer step.*not exported nor published to export_dir={models}"):
        train(cfg)
    assert not models.exists() and not (tmp_path / "run" / "model.safetensors").exists()
