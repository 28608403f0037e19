"""``rails_lightning.callbacks.ModelCheckpoint``: ``last.ckpt`` is the latest epoch even when validation stops
improving (a resumed fit repeats nothing), ``best.ckpt`` is the validation-selected one."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from conftest import cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.callbacks import CorpusEvaluation, ModelCheckpoint


class EpochsRun(Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


def _epoch_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def _fit(root, epochs, ckpt_path=None, checkpoint_class=ModelCheckpoint):
    # Monitoring the global step for its minimum makes epoch 0 the best for good: validation "stops improving" at
    # once, whatever the model learns.
    checkpoint = checkpoint_class(dirpath=root / "checkpoints", monitor="step", mode="min", save_last=True,
                                 filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    ran = EpochsRun()
    torch.manual_seed(0)
    data = make_tiny_data()
    trainer = cpu_trainer(root, epochs, [CorpusEvaluation(ks=(10,)), checkpoint, ran])
    trainer.fit(make_tiny_model(data), datamodule=data, ckpt_path=ckpt_path)
    return checkpoint, ran.epochs


def test_last_is_the_latest_epoch_and_best_the_selected_one_when_validation_stops_improving(tmp_path):
    checkpoint, _ = _fit(tmp_path, epochs=3)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "epoch000.ckpt", "last.ckpt"]
    assert _epoch_of(folder / "last.ckpt") == 2
    assert _epoch_of(folder / "best.ckpt") == 0
    assert os.path.samefile(folder / "best.ckpt", checkpoint.best_model_path)  # a link, no second copy on disk


def test_a_fit_resumed_from_last_goes_on_from_its_latest_epoch(tmp_path):
    _fit(tmp_path, epochs=3)
    checkpoint, epochs_run = _fit(tmp_path, epochs=5, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert epochs_run == [3, 4]  # not the epochs after the best one (0) again
    assert _epoch_of(tmp_path / "checkpoints" / "last.ckpt") == 4
    assert _epoch_of(tmp_path / "checkpoints" / "best.ckpt") == 0
    assert os.path.samefile(tmp_path / "checkpoints" / "best.ckpt", checkpoint.best_model_path)


def test_a_run_checkpointed_by_lightnings_callback_resumes_with_its_best_kept(tmp_path):
    """Run folders from before this callback: its state is stored under Lightning's key, so it is restored."""
    _fit(tmp_path, epochs=2, checkpoint_class=LightningModelCheckpoint)
    # (Where Lightning's last.ckpt held the best epoch, 0, the resume repeats epoch 1: not asserted, it is Lightning's.)
    checkpoint, _ = _fit(tmp_path, epochs=3, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert Path(checkpoint.best_model_path).name == "epoch000.ckpt"  # restored: a fresh callback would pick epoch 1
    assert _epoch_of(tmp_path / "checkpoints" / "best.ckpt") == 0
    assert _epoch_of(tmp_path / "checkpoints" / "last.ckpt") == 2


def test_best_is_a_copy_where_the_filesystem_has_no_links_and_follows_a_new_best(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", no_links)
    first, second, best = tmp_path / "epoch000.ckpt", tmp_path / "epoch001.ckpt", tmp_path / "best.ckpt"
    first.write_bytes(b"epoch 0")
    ModelCheckpoint._point_best_at(first, best)
    assert best.read_bytes() == b"epoch 0" and not os.path.samefile(first, best)
    copied_at = best.stat().st_ino
    ModelCheckpoint._point_best_at(first, best)
    assert best.stat().st_ino == copied_at  # unchanged best: not copied again
    second.write_bytes(b"epoch 1, better")
    ModelCheckpoint._point_best_at(second, best)
    assert best.read_bytes() == b"epoch 1, better"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "epoch000.ckpt", "epoch001.ckpt"]
