"""Lightning trainer plugins (``trainer.plugins`` in a config): how checkpoints are written."""

from rails_lightning.plugins.checkpoint_io import AtomicCheckpointIO

__all__ = ["AtomicCheckpointIO"]
