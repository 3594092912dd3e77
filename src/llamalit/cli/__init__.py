"""Command-line entry points (Hydra apps)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from llamalit.data.download import DownloadError

# The Hydra config tree ships inside the package (llamalit/conf), so an installed wheel finds it too.
# Every entry point names it by package (Hydra's pkg:// search path); CONF_DIR is the same tree on disk.
CONFIG_PATH = "pkg://llamalit.conf"
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# What bad input raises (a missing file, a wrong value or format, an unreachable URL, a diverged run); the
# message already names the key, file or step, so the command prints it as one line instead of a traceback.
USER_ERRORS = (OSError, ValueError, DownloadError, FloatingPointError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :data:`USER_ERRORS` into ``error: <message>`` on stderr and exit status 1.
    ``HYDRA_FULL_ERROR=1`` keeps the full traceback, as in Hydra."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
