"""Checkpoint writes that a crash cannot half-do.

Lightning's own writer saves through a temporary file in ``$TMPDIR`` and moves it into place; when
``$TMPDIR`` is another filesystem (tmpfs on many clusters) the move is a copy, and a kill during it
leaves a truncated ``last.ckpt`` where the previous good one was. Here the temporary file lives in the
checkpoint's own folder and replaces the checkpoint with one atomic rename, after an fsync: a reader
sees the old file or the new one, never a part. A kill can leave a hidden ``.<name>.*.tmp`` file; the
next save to that folder removes it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are a temporary file in the target folder + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed mid-save
            leftover.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
