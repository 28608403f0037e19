from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.data.datamodule import InteractionDataModule
from rails_lightning.data.sequences import DataError
from rails_lightning.data.sources import InteractionLogSource, InteractionSource, MovieLensSource, SyntheticSource

__all__ = [
    "InteractionDataModule", "InteractionSource", "SyntheticSource", "MovieLensSource", "InteractionLogSource",
    "TrainBatch", "QueryBatch", "DataError",
]
