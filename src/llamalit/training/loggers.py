"""The metric logger of a run, from ``conf/logger/*.yaml``: wandb (offline without an API key), CSV or none."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from llamalit.utils.wandb_mode import has_wandb_credentials, wandb_mode  # noqa: F401 - also imported from here


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
    logger = WandbLogger(
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
    if logger._wandb_init.get("anonymous") is None:  # passed as None, wandb warns that the setting is deprecated
        logger._wandb_init.pop("anonymous", None)
    return logger


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_library_output() -> None:
    """Each library message once, without advertising: under Hydra (which configured the root logger)
    Lightning's own console handler is removed, so its INFO lines print once, through Hydra's handlers
    (and land in the run's log file); Lightning's tip to install litlogger and its warnings about its own
    internals are dropped."""
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lib = logging.getLogger(name)
            for handler in list(lib.handlers):
                if type(handler) is logging.StreamHandler:
                    lib.removeHandler(handler)
            lib.propagate = True
    # Lightning's own use of a torch API that torch deprecated, and its note that the module's
    # on_before_batch_transfer is the one used (as intended: the module moves and trims its batches)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")
    # a resumed run writes its checkpoints in its own run directory, by design
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTips())


def finish_wandb() -> None:
    """Close the current wandb run, if any, so the next job of a multirun starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
