"""The metric logger of a run, from ``conf/logger/*.yaml``: wandb (offline without an API key), CSV or none."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


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


def build_logger(cfg: Mapping, run_dir: Path, run_name: str, group: str | None,
                 config: dict) -> Logger | None:
    """A Lightning logger writing under ``run_dir``; the resolved run config is attached to it."""
    kind = cfg.get("kind", "wandb")
    if kind == "none":
        return None
    if kind == "csv":
        logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
        logger.log_hyperparams(config)
        return logger
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r}: choose wandb, csv or none")
    return WandbLogger(
        project=cfg.get("project", "llamalit"),
        entity=cfg.get("entity"),
        name=cfg.get("name") or run_name,
        group=cfg.get("group") or group,
        tags=list(cfg.get("tags") or []),
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.get("mode")),
        log_model=bool(cfg.get("log_model", False)),
        config=config,
    )


def finish_wandb() -> None:
    """Close the current wandb run, if any, so the next job of a multirun starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
