"""Lightning checkpoints written atomically: a temp file beside the target, then a rename onto it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH

from llamalit.utils.fileio import DiskFullError, atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local files never appear half-written.

    Lightning's own writer opens the target and streams into it, so a full disk or a kill mid-write leaves
    a truncated ``last.ckpt`` in place of the previous good one. Here the bytes go to a temp file in the same
    folder, flushed to disk, and only a complete file is renamed onto the target (the old one stays until then).
    Remote paths (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except DiskFullError as e:
            raise DiskFullError(f"{e}. {kept_checkpoint(Path(path).parent)}") from e


def kept_checkpoint(folder: Path) -> str:
    """What a failed checkpoint write left in ``folder``: the newest whole checkpoint and how to resume from it."""
    for ckpt in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:  # mmap: only the archive's index is read
            step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        except Exception:  # noqa: BLE001 - an unreadable file is not a kept checkpoint
            continue
        return (f"Kept: {ckpt} (the last whole checkpoint, step {step}); free some space (or raise the limit) "
                f"and resume with ckpt_path={ckpt}")
    return f"No whole checkpoint is in {folder} yet; free some space (or raise the limit) and start the run again"
