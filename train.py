"""Train a Llama: ``python train.py experiment=demo`` (Hydra overrides; ``-m`` for sweeps)."""

from llamalit.cli.train import main

if __name__ == "__main__":
    main()
