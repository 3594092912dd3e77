"""Resuming a run in its own directory: the checkpoint checked first, then one run directory for the whole run.

``ckpt_path=last`` (or a ``.ckpt`` under some ``RUN/checkpoints/``) continues in ``RUN``: its ``metrics.csv`` is
appended to (rows past the checkpoint's step, logged before the crash, are dropped so the curve has no
duplicates), its wandb run id (``RUN/wandb_id``) is resumed, its ``summary.json`` is rewritten at the end.

Hydra makes a fresh run directory before ``train()`` runs. :func:`continue_in` moves what Hydra wrote there
(``.hydra/`` and the log file) to ``RUN/resumes/<fresh dir name>/``, points the log file handlers at ``RUN``'s log
(appending), and removes the fresh directory when nothing else is in it. So the resume invocation's config is
kept, and nothing of one training is spread over two places.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import uuid
import zipfile
from pathlib import Path

from llamalit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
CSV_METRICS = Path("csv") / "metrics.csv"  # CSVLogger(save_dir=run_dir, name="csv", version="")
_HYDRA_RECORDS = (".hydra",)


def check_ckpt_file(ckpt_path: str) -> None:
    """Refuse, before anything else runs, a ``ckpt_path`` that is missing or a truncated training checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # every checkpoint train.py writes is a torch zip archive
        raise ValueError(f"ckpt_path={ckpt_path} is not a training checkpoint (not a torch zip archive; a .ckpt "
                         "that train.py wrote under run_dir/checkpoints/). To start from other weights use init_from=")
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"ckpt_path={ckpt_path} is a truncated training checkpoint ({path.stat().st_size} bytes; "
                         f"its archive index is missing: {e}): the write was cut short (a full disk, a kill). "
                         "Resume from an intact one (ckpt_path=last takes the newest readable checkpoint of this "
                         "experiment) or start afresh") from e


def run_dir_of(ckpt_path: str | None) -> Path | None:
    """``RUN`` for a checkpoint at ``RUN/checkpoints/*.ckpt``, else None."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def continue_in(old: Path, fresh: Path) -> Path:
    """Continue the run of ``old``; ``fresh`` (the directory Hydra made for this invocation) is folded into it.

    Returns ``old``. ``fresh`` is removed when it holds only Hydra's records and log files; otherwise it is
    left as it is (a directory the user gave that holds other files).
    """
    old, fresh = old.resolve(), fresh.resolve()
    if old == fresh or not fresh.exists():
        return old
    _repoint_log_files(fresh, old)
    entries = list(fresh.iterdir())
    if all(p.name in _HYDRA_RECORDS or p.suffix == ".log" for p in entries):
        keep = old / "resumes" / fresh.name
        keep.mkdir(parents=True, exist_ok=True)
        for p in entries:
            if p.name in _HYDRA_RECORDS:
                shutil.move(str(p), str(keep / p.name))
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("resuming in the checkpoint's run directory %s (this invocation's Hydra config: %s)", old,
             old / "resumes" / fresh.name)
    return old


def _repoint_log_files(fresh: Path, old: Path) -> None:
    """Log file handlers writing under ``fresh`` append to the same file name under ``old`` instead."""
    for logger in [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
                handler.acquire()
                try:
                    handler.close()
                    handler.baseFilename = str(old / Path(handler.baseFilename).name)
                    handler.mode = "a"
                    handler.stream = handler._open()
                finally:
                    handler.release()


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows of ``run_dir``'s ``metrics.csv`` logged after ``step`` (before a crash, past the checkpoint
    the run resumes from): the resumed run logs those steps again."""
    path = run_dir / CSV_METRICS
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]
    if len(kept) == len(rows):
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue())


def wandb_run_id(run_dir: Path) -> tuple[str, bool]:
    """(the wandb run id of ``run_dir``, whether it was there already), written to ``run_dir/wandb_id`` on first
    use: a resumed run logs into the same wandb run."""
    path = run_dir / WANDB_ID_FILE
    try:
        found = path.read_text().strip()
    except OSError:
        found = ""
    if found:
        return found, True
    new = uuid.uuid4().hex[:8]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(new + "\n")
    return new, False
