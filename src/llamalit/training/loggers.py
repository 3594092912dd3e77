"""The metric logger of a run, from ``conf/logger/*.yaml``: wandb (offline without an API key), CSV or none."""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from llamalit.training.resume import wandb_run_id
from llamalit.utils.wandb_mode import has_wandb_credentials, wandb_mode  # noqa: F401 - also imported from here


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` (a resumed run's) is appended to, not
    deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """:class:`CSVLogger` writing through :class:`_AppendingWriter`: one ``metrics.csv`` for a run and its
    resumes."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_logger(cfg: Mapping, run_dir: Path, run_name: str, group: str | None,
                 config: dict) -> Logger | None:
    """A Lightning logger writing under ``run_dir``; the resolved run config is attached to it."""
    kind = cfg.get("kind", "wandb")
    if kind == "none":
        return None
    if kind == "csv":
        logger = AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")
        logger.log_hyperparams(config)
        return logger
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r}: choose wandb, csv or none")
    mode = wandb_mode(cfg.get("mode"))
    run_id, resumed = wandb_run_id(run_dir)  # kept in the run directory: a resume continues the same wandb run
    if mode == "offline":  # the ~30-line offline banner (sync hints, paths) says nothing the run directory does not
        os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        id=run_id,
        resume="allow" if resumed else None,
        project=cfg.get("project", "llamalit"),
        entity=cfg.get("entity"),
        name=cfg.get("name") or run_name,
        group=cfg.get("group") or group,
        tags=list(cfg.get("tags") or []),
        save_dir=str(run_dir),
        mode=mode,
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
