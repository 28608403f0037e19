"""The data layer: interaction sources, per-user sequences and splits, typed batches, the DataModule.

Modules: ``source`` (the source interface), ``synthetic`` / ``known_truth`` / ``movielens`` / ``log_files`` /
``beir`` (the sources; ``beir`` reads document-search data whose queries are texts), ``item_content`` (item tables: text, categorical, numeric columns), ``tables`` (reading a table file),
``columns`` (checks of columns read from files), ``sequences`` (sequence store and
splits), ``batches`` (typed batches), ``datamodule`` (the LightningDataModule).
"""

from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.data.beir import BeirSource
from rails_lightning.data.datamodule import InteractionDataModule
from rails_lightning.data.item_content import ItemContent, ItemTable
from rails_lightning.data.known_truth import KnownTruthSource
from rails_lightning.data.log_files import InteractionLogSource
from rails_lightning.data.movielens import MovieLensSource
from rails_lightning.errors import DataError
from rails_lightning.data.source import InteractionSource
from rails_lightning.data.synthetic import SyntheticSource

__all__ = [
    "InteractionDataModule", "InteractionSource", "SyntheticSource", "MovieLensSource", "InteractionLogSource",
    "KnownTruthSource", "BeirSource", "ItemTable", "ItemContent",
    "TrainBatch", "QueryBatch", "DataError",
]
