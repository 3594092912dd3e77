"""Convert a checkpoint: ``python scripts/export.py ckpt=PATH format=llama2c|llama2c_v1|llama2c_q8|hf|peft|merged out=PATH``."""

from llamalit.cli.export import main

if __name__ == "__main__":
    main()
