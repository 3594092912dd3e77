"""Talk to a checkpoint: ``python chat.py ckpt=PATH [template=NAME temperature=T ...]`` (Hydra overrides)."""

from llamalit.cli.chat import main

if __name__ == "__main__":
    main()
