from rails_lightning.callbacks.checkpoints import ModelCheckpoint
from rails_lightning.callbacks.corpus_evaluation import CorpusEvaluation
from rails_lightning.callbacks.epoch_lines import EpochLines
from rails_lightning.callbacks.wandb_logging import WandbBestCheckpoint, WandbHitRateTable

__all__ = ["CorpusEvaluation", "EpochLines", "ModelCheckpoint", "WandbHitRateTable", "WandbBestCheckpoint"]
