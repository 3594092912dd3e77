"""The README's first two commands as a new user runs them: ``python train.py experiment=demo`` and then
``python train.py experiment=demo_lora``, on an empty HOME without ``LLAMALIT_CACHE``, so the default cache
``~/.cache/llamalit`` (a literal ``~`` in the config) is where the demo model is published and found.

Their output is what a user reads: each Lightning line once, no litlogger tip, no wandb or library warnings,
no "modules in eval mode" for the LoRA run (its dropout must be on).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# tiny sizes; the experiments' own settings (data, LoRA, export_dir, init_from) stay
TINY = ["model=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "data.n_shards=2", "data.stories_per_shard=60", "data.tokenizer=train:384",
        "data.batch_size=4", "data.num_workers=1", "evaluation.adherence_n=0", "callbacks.samples.max_new_tokens=4"]


def user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLAMALIT_CACHE" and not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_MODE="offline", PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return env


def train_cli(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=user_env(home),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_then_lora(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    demo = train_cli(["experiment=demo", *TINY], home, work)
    lora = train_cli(["experiment=demo_lora", *TINY, "logger=csv"], home, work) \
        if demo.returncode == 0 else None
    return home, demo, lora


def test_demo_lora_finds_the_demo_model_in_the_default_cache(demo_then_lora):
    home, demo, lora = demo_then_lora
    assert demo.returncode == 0, demo.stderr[-3000:]
    published = home / ".cache" / "llamalit" / "models" / "demo"
    assert (published / "model.safetensors").is_file() and (published / "config.json").is_file()
    assert not list(home.parent.glob("**/~"))  # no literal "~" directory anywhere
    assert lora.returncode == 0, lora.stderr[-3000:]


def test_a_demo_run_says_each_thing_once_and_nothing_else(demo_then_lora):
    _, demo, lora = demo_then_lora
    out = demo.stdout + demo.stderr
    assert out.count("Seed set to 1337") == 1, out[-3000:]
    assert out.count("`Trainer.fit` stopped") == 1
    for noise in ("Tip:", "litlogger", "anonymous setting", "is deprecated", "DeprecationWarning", "FutureWarning",
                  "on_before_batch_transfer"):
        assert noise not in out, noise


def test_the_lora_run_trains_with_its_dropout_on(demo_then_lora):
    _, _, lora = demo_then_lora
    out = lora.stdout + lora.stderr
    assert "Trainable params" in out  # the model summary was printed
    assert "in eval mode at the start of training" not in out
    assert "Modules in eval mode: 0" in out


def test_prepare_on_an_empty_home_makes_no_literal_tilde_directory(tmp_path):
    """scripts/prepare.py keeps its logs under the cache: Hydra makes that run directory itself, so the
    default cache must not reach it as a literal ``~`` (a ``./~`` directory in the working directory)."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare.py"), "data=synthetic", "data.n_shards=2",
                           "data.stories_per_shard=60", "data.tokenizer=train:384", "data.num_workers=1",
                           "progress=false"], cwd=work, env=user_env(home), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (home / ".cache" / "llamalit" / "data" / "synthetic" / "manifest.json").is_file()
    assert list(work.iterdir()) == []
