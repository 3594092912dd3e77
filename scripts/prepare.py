"""Download / tokenize / pretokenize what ``data=NAME`` needs: ``python scripts/prepare.py data=NAME [k=v ...]``."""

from llamalit.cli.prepare import main

if __name__ == "__main__":
    main()
