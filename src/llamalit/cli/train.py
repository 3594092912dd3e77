"""``python train.py experiment=NAME [key=value ...]`` / ``llamalit-train``: one run, or a sweep with -m."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llamalit.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Train; return the final val/loss (what a Hydra sweeper such as Optuna minimises)."""
    from llamalit.cli import user_errors

    with user_errors():
        check_early(cfg)  # bad settings are reported before lightning (and torch) are imported: seconds, not 15
        from llamalit.training.run import train

        return train(cfg)["val/loss"]


def check_early(cfg: DictConfig) -> None:
    """The checks of ``train()`` that need no data and no Lightning: the numbers first (omegaconf only), then the
    model shape and ``init_from`` (which import torch). ``train()`` runs them again; they are cheap."""
    from llamalit.settings.checks import TRAIN_PATH_KEYS, check_train_settings, expand_paths

    expand_paths(cfg, TRAIN_PATH_KEYS)
    check_train_settings(cfg)
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last":
        from llamalit.training.resume import check_ckpt_file

        check_ckpt_file(str(cfg.ckpt_path))
    from llamalit.settings.checks import preflight

    preflight(cfg)


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
