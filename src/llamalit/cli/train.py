"""``python train.py experiment=NAME [key=value ...]`` / ``llamalit-train``: one run, or a sweep with -m."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llamalit.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the final val/loss (what a Hydra sweeper such as Optuna minimises)."""
    from llamalit.cli import user_errors
    from llamalit.training.run import train

    with user_errors():
        return train(cfg)["val/loss"]


if __name__ == "__main__":
    main()
