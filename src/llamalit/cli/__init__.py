"""Command-line entry points (Hydra apps)."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import sys
from collections.abc import Iterator

from llamalit.data.download import DownloadError

# The Hydra config tree is conf/ at the top of the repository, shipped inside the package as llamalit.conf
# (pyproject's package-dir), so an installed wheel finds it too. Every entry point names it by package
# (Hydra's pkg:// search path); CONF_DIR is the same tree on disk: conf/ in a checkout (an editable
# install maps the package there), llamalit/conf in an installed wheel.
CONFIG_PATH = "pkg://llamalit.conf"
CONF_DIR = str(importlib.resources.files("llamalit.conf"))

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
