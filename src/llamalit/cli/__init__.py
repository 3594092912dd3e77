"""Command-line entry points (Hydra apps)."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

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
        if _full_error():
            raise
        _fail(str(e))


_USER_FULL_ERROR = "LLAMALIT_USER_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept while run_cli sets it to 1


def _full_error() -> bool:
    return os.environ.get(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR")) == "1"


def _fail(message: str) -> None:
    print(f"error: {message}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    sys.exit(1)


def run_cli(hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function with Hydra's own mistakes (an unknown config group option or key, a bad
    override, a run directory it cannot make) as one ``error:`` line listing what exists, like every other bad
    input. Hydra prints those itself in several lines unless HYDRA_FULL_ERROR=1 makes it raise them: so it is set
    here, and the user's own setting (which keeps tracebacks) is remembered in LLAMALIT_USER_FULL_ERROR."""
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra_main()
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised as it is
        message = hydra_error_line(e)
        if message is None or _full_error():
            raise
        _fail(message)


def hydra_error_line(e: BaseException) -> str | None:
    """One line for an error Hydra raises before the task runs, or None when ``e`` is not one."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, MissingConfigException):
        options = f"; the options are: {', '.join(e.options)}" if e.options else ""
        return f"{first}{options}"
    if isinstance(e, ConfigCompositionException):
        cause = e.__cause__
        parent = getattr(cause, "parent_node", None)
        key = getattr(cause, "full_key", None)
        if parent is not None and key and hasattr(parent, "keys"):
            where = f"under {key.rsplit('.', 1)[0]}" if "." in key else "at the top"
            return (f"{key}: no such key (to add one, prefix it with +: +{key}=...); the keys {where} are: "
                    f"{', '.join(str(k) for k in parent.keys() if k != 'hydra')}")
        return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, OSError) and getattr(e, "filename", None):  # the task's own OSErrors end in user_errors
        return (f"cannot write the run directory: {e.filename}: {e.strerror}; set hydra.run.dir= (hydra.sweep.dir= "
                "with -m) to a directory you can write")
    return None
