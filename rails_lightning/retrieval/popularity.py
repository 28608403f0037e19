"""Most-popular-items baseline: every query gets the most frequent training items it has not seen."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from rails_lightning.metrics import RetrievalMetrics
from rails_lightning.retrieval.topk import BruteForceTopK, TopKRetriever


class PopularityTopK(TopKRetriever):
    """Ranks items by their training-set count; queries are only counted (any tensor with one row per query)."""

    def __init__(self, item_counts: np.ndarray | Tensor) -> None:  # (N + 1,), [0] is padding
        counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float32)[1:]
        self.num_items = len(counts)
        self.exact = BruteForceTopK(lambda queries, start, end: counts[start:end].expand(len(queries), -1), self.num_items, 1 << 30)

    def fetch(self, queries, k, exclude=None):
        return self.exact.fetch(queries, k)


def popularity_baseline(datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), exclude_history: bool = True) -> dict[str, float]:
    """Full-corpus metrics of the popularity baseline on the DataModule's val or test queries."""
    datamodule.setup(stage)
    retriever = PopularityTopK(datamodule.train_item_counts)
    metric = RetrievalMetrics(ks)
    loader = datamodule.val_dataloader() if stage == "val" else datamodule.test_dataloader()
    for batch in loader:
        _, ids = retriever.search(batch.user_ids, max(ks), batch.exclusion if exclude_history else None)
        metric.update(ids, batch.targets)
    return {f"{stage}/{name}": float(value) for name, value in metric.compute().items()}
