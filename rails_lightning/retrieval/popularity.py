"""Most-popular-items baseline: every query gets the most frequent training items it has not seen."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from rails_lightning.metrics import RetrievalMetrics
from rails_lightning.retrieval.topk import BruteForceTopK, TopKRetriever


class PopularityTopK(TopKRetriever):
    """Ranks items by their training-set count, excluding each query's history."""

    def __init__(self, item_counts: np.ndarray | Tensor) -> None:  # (N + 1,), [0] is padding
        counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float32)[1:]
        self._exact = BruteForceTopK(
            lambda queries, start, end: counts[start:end].expand(len(queries), -1), num_items=len(counts)
        )

    def search(self, queries, k, exclude_offsets=None, exclude_items=None):
        return self._exact.search(queries, k, exclude_offsets, exclude_items)


def popularity_baseline(datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), exclude_history: bool = True) -> dict[str, float]:
    """Full-corpus metrics of the popularity baseline on the DataModule's val or test queries."""
    datamodule.setup(stage)
    retriever = PopularityTopK(datamodule.train_item_counts)
    metric = RetrievalMetrics(ks)
    loader = datamodule.val_dataloader() if stage == "val" else datamodule.test_dataloader()
    for batch in loader:
        exclude = (batch.exclude_offsets, batch.exclude_items) if exclude_history else (None, None)
        _, ids = retriever.search(batch.user_ids, max(ks), *exclude)
        metric.update(ids, batch.targets)
    return {f"{stage}/{name}": float(value) for name, value in metric.compute().items()}
