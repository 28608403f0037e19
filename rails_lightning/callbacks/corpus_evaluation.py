"""Full-corpus evaluation at every validation and test epoch.

At the start of the epoch the whole item corpus is re-encoded with the current
weights and handed to the model's own top-k routine (a FAISS or torch inner-product
search for dot-product models, exact MoL scoring or a RAILS algorithm for MoL): the
callback never assumes the score is an inner product. Each validation batch's query
representations are searched, the user's history excluded, and the top-K ids feed a
``RetrievalMetrics`` whose sum states synchronise under DDP. Metrics are logged as
``val/hr@10``, ``test/ndcg@10``, ``val/mrr``, ...
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from rails_lightning.metrics import RetrievalMetrics


class CorpusEvaluation(Callback):
    """Re-encode the corpus, retrieve the top K for every query, log HR/Recall/NDCG@K and MRR.

    Args:
        ks: cut-offs K of HR@K, Recall@K and NDCG@K; MRR is truncated at max(ks).
        exclude_history: do not rank items already in the user's history.
        item_chunk_size: items encoded at once when re-encoding the corpus.
    """

    def __init__(self, ks: Sequence[int] = (1, 10, 50, 200), exclude_history: bool = True, item_chunk_size: int = 65536) -> None:
        self.ks = tuple(ks)
        self.exclude_history = exclude_history
        self.item_chunk_size = item_chunk_size
        self.metrics = RetrievalMetrics(self.ks)
        self.retriever = None
        self.search_seconds = 0.0

    # -- epoch start: corpus -> retriever
    def _start(self, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            items = pl_module.encode_corpus(self.item_chunk_size)
            self.retriever = pl_module.build_retriever(items)
        self.index_seconds = time.perf_counter() - started
        self.search_seconds = 0.0
        self.metrics = self.metrics.to(pl_module.device)
        self.metrics.reset()

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    # -- every batch: search and accumulate
    def _batch(self, batch: Any, queries: Any) -> None:
        started = time.perf_counter()
        exclude = (batch.exclude_offsets, batch.exclude_items) if self.exclude_history else (None, None)
        _, ids = self.retriever.search(queries, max(self.ks), *exclude)
        self.search_seconds += time.perf_counter() - started
        self.metrics.update(ids.to(batch.targets.device), batch.targets)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(batch, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(batch, outputs)

    # -- epoch end: log
    def _end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {f"{stage}/{name}": value for name, value in self.metrics.compute().items()}
        values[f"{stage}/index_seconds"] = torch.tensor(self.index_seconds)
        values[f"{stage}/search_seconds"] = torch.tensor(self.search_seconds)
        # Already reduced across processes by the metric's sum states.
        pl_module.log_dict(values, sync_dist=False)
        self.retriever = None  # free the index between epochs

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end("test", trainer, pl_module)
