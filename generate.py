"""Sample from a checkpoint: ``python generate.py ckpt=PATH prompt="Once upon a time"`` (Hydra overrides)."""

from llamalit.cli.generate import main

if __name__ == "__main__":
    main()
