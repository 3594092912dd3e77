"""Serve a checkpoint over the OpenAI API with a web page: ``python serve.py ckpt=PATH [port=8000 ...]``."""

from llamalit.cli.serve import main

if __name__ == "__main__":
    main()
