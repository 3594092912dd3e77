"""Instruction adherence of a checkpoint: ``python scripts/evaluate.py ckpt=PATH data=synthetic [n=100 ...]``."""

from llamalit.cli.evaluate import main

if __name__ == "__main__":
    main()
