"""``python serve.py ckpt=PATH [host=127.0.0.1 port=8000 api_key=KEY]`` / ``llamalit-serve``: an
OpenAI-compatible server with batched decoding and a web page (``llamalit.inference.server``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
def hydra_main(cfg: DictConfig) -> None:
    from llamalit.cli import user_errors

    with user_errors():
        try:
            from llamalit.inference.server import serve
        except ImportError as e:
            raise ValueError(f"llamalit-serve needs {e.name}: pip install 'llamalit[serve]'") from e
        serve(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
