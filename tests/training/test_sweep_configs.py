"""conf/sweep: the Optuna sweeper over lora.rank x lora.alpha and the SLURM launcher wired to the Trainer."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

import llamalit.cli
from llamalit.model.lora import LoraConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(llamalit.cli.CONF_DIR)
EXPERIMENT = "demo_lora" if (CONF / "experiment" / "demo_lora.yaml").is_file() else "instruct_lora"

optuna_plugin = pytest.importorskip(
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper",
    reason="hydra-optuna-sweeper is not installed (pip install 'llamalit[sweep]')")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={EXPERIMENT}", *overrides], return_hydra_config=True)


def _choices(expr: str) -> list:
    """The values of a sweep expression such as ``choice(1, 2, 4)``."""
    override = OverridesParser.create().parse_override(f"x={expr}")
    return list(override.sweep_iterator())


def test_optuna_sweeper_searches_rank_and_alpha():
    cfg = _compose("+sweep=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert str(sweeper.direction) in ("minimize", "Direction.minimize")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert set(sweeper.params) == {"lora.rank", "lora.alpha"}
    ranks, alphas = _choices(sweeper.params["lora.rank"]), _choices(sweeper.params["lora.alpha"])
    assert 2 in ranks and len(ranks) >= 3 and len(alphas) >= 3
    for rank, alpha in itertools.product(ranks, alphas):  # every point of the space is a valid adapter
        lora = LoraConfig.from_dict({**OmegaConf.to_container(cfg.lora), "rank": rank, "alpha": alpha})
        assert isinstance(lora.rank, int) and lora.scaling == alpha / rank
    assert cfg.lora.enabled, f"experiment={EXPERIMENT} must train LoRA for a rank x alpha search"
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")  # optuna alone runs jobs locally


@pytest.fixture
def slurm_plugin():
    return pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher",
                               reason="hydra-submitit-launcher is not installed (pip install 'llamalit[sweep]')")


def test_slurm_launcher_follows_the_trainer(slurm_plugin):
    cfg = _compose("+sweep=slurm", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy == "auto"
    default = _compose("+sweep=slurm")
    assert (default.hydra.launcher.gpus_per_node, default.hydra.launcher.nodes) == (1, 1)
    both = _compose("+sweep=[optuna,slurm]")
    assert both.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert both.hydra.launcher._target_.endswith("SlurmLauncher")


def test_slurm_job_script_asks_for_one_task_per_gpu(slurm_plugin, tmp_path, monkeypatch):
    """The real launcher code builds the sbatch script (submission itself is intercepted)."""
    import submitit

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    captured = {}

    class Intercepted(Exception):
        pass

    def fake_map_array(self, fn, *args):
        captured["script"] = self._executor._make_submission_file_text("python -u job.py", "uid")
        raise Intercepted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    cfg = _compose("+sweep=slurm", "trainer.devices=8", "trainer.num_nodes=3", "hydra.launcher.partition=gpu",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Intercepted):
        launcher.launch([["lora.rank=2"], ["lora.rank=4"]], initial_job_idx=0)
    script = captured["script"]
    for line in ("--nodes=3", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                 "--partition=gpu", "--time=240"):
        assert f"#SBATCH {line}" in script, (line, script)


@pytest.mark.slow
def test_optuna_sweep_runs_a_study(tmp_path):
    """A real Optuna study through our config tree, with a stand-in task that returns a known objective."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import json
        from pathlib import Path
        import hydra
        from hydra.core.hydra_config import HydraConfig

        @hydra.main(version_base="1.3", config_path={str(CONF)!r}, config_name="train")
        def main(cfg):
            loss = (cfg.lora.rank - 4) ** 2 + cfg.lora.alpha / 100
            out = Path(HydraConfig.get().runtime.output_dir) / "trial.json"
            out.write_text(json.dumps({{"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "loss": loss}}))
            return loss

        if __name__ == "__main__":
            main()
    """))
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(app), "-m", f"experiment={EXPERIMENT}", "+sweep=optuna", "logger=none",
         "hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={sweep_dir}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")]
    assert len(trials) == 5
    ranks = _choices(OmegaConf.load(CONF / "sweep" / "optuna.yaml").hydra.sweeper.params["lora.rank"])
    assert all(t["rank"] in ranks for t in trials)
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(t["loss"] for t in trials))  # minimised, not maximised
