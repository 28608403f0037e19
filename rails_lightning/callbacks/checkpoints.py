"""Lightning's ``ModelCheckpoint`` with two names a researcher can rely on: ``last.ckpt`` and ``best.ckpt``.

Lightning 2.6 rewrites ``last.ckpt`` only at a step where it also saved a top-k checkpoint. With the usual
``monitor: val/hr@10, save_top_k: 1``, that is only when validation improves: once it stops improving, ``last.ckpt``
holds the best epoch, a fit resumed from it repeats every epoch after that one, and a command given ``last.ckpt``
gets the best weights without saying so. Here ``last.ckpt`` is the latest validated epoch, always, and ``best.ckpt``
names the validation-selected checkpoint under a fixed name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments, same top-k files), plus:

    - ``last.ckpt`` (with ``save_last: true``) is rewritten at every save point (each validation, or each training
      epoch end where checkpoints are saved there): the point to resume from, so a resumed fit repeats nothing.
    - ``best.ckpt`` is the best checkpoint on ``monitor``, the one the fit's own test stage reads (a hard link to the
      top-k file, or a copy where the filesystem has no links); `validate`, `test` and `index` given
      ``RUN_DIR/checkpoints/best.ckpt`` see the validation-selected weights. Written by the first process, only to a
      local directory.
    """

    BEST_NAME = "best"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest_and_best(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_latest_and_best(trainer)

    def _save_latest_and_best(self, trainer: pl.Trainer) -> None:
        # Lightning skips when anything was saved at this step: then last.ckpt was written beside the top-k file.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.monitor is not None and trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            self._point_best_at(Path(self.best_model_path), Path(self.dirpath) / f"{self.BEST_NAME}{self.FILE_EXTENSION}")

    @staticmethod
    def _point_best_at(best: Path, link: Path) -> None:
        """Make ``link`` the same file as ``best``, replacing it in one step (a reader never sees it missing)."""
        if not best.is_file() or best == link or (link.exists() and _same_contents(best, link)):
            return
        staged = link.with_name(f".{link.name}.staged")
        staged.unlink(missing_ok=True)
        try:
            os.link(best, staged)
        except OSError:  # no hard links here (another filesystem type): a copy
            shutil.copy2(best, staged)
        os.replace(staged, link)


def _same_contents(a: Path, b: Path) -> bool:
    """One file, or a copy of it (``copy2`` keeps the time of the last change)."""
    if os.path.samefile(a, b):
        return True
    stat_a, stat_b = a.stat(), b.stat()
    return (stat_a.st_size, stat_a.st_mtime_ns) == (stat_b.st_size, stat_b.st_mtime_ns)
