"""Whether a run logs to wandb online or offline: online with credentials, offline without."""

from __future__ import annotations

import netrc
import os


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (as ``wandb login`` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str | None) -> str:
    """``auto`` becomes online with credentials, offline without; WANDB_MODE in the environment wins."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if configured in (None, "auto"):
        return "online" if has_wandb_credentials() else "offline"
    if configured not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode={configured!r}: choose auto, online, offline or disabled")
    return configured
