"""``llamalit-prepare`` / ``python scripts/prepare.py data=NAME [key=value ...]``: prepare a data config."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llamalit.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def hydra_main(cfg: DictConfig) -> None:
    """Prepare ``cfg.data`` under ``cfg.data.dir`` and print a one-line summary."""
    from llamalit.cli import user_errors
    from llamalit.data.prepare import run_prepare
    from llamalit.settings.checks import DATA_PATH_KEYS, check_data_settings, expand_paths

    with user_errors():
        expand_paths(cfg, DATA_PATH_KEYS)
        check_data_settings(cfg)
        result = run_prepare(cfg.data, cfg.paths.cache_dir, progress=bool(cfg.get("progress", True)))
    print(result.summary(), flush=True)


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
