"""The most-popular-items baseline every model is reported beside: each query gets the most frequent
items it has not seen, evaluated under the protocol ``CorpusEvaluation`` applies to a model (the full
corpus, the user's history excluded, the same ``RetrievalMetrics`` over the same val or test queries).
``fit`` records it in the run record (``RunRecord.baseline``) beside the best checkpoint's metrics.

Fair to the model it is compared with: the counts are over what the model sees at that stage
(``InteractionDataModule.visible_item_counts``: at test time the validation item too), the same
history is excluded, and ties are broken *against* the baseline: a target tied in count with other
items ranks after all of them (a baseline that put its target first among equals would look better
than any ranking could justify).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from rails_lightning.metrics import RetrievalMetrics
from rails_lightning.retrieval.topk import BruteForceTopK, TopKRetriever


class PopularityTopK(TopKRetriever):
    """Ranks items by count, excluding each query's history. The queries are each query's target ids
    (B, T), 0-padded (or any (B,) tensor for no targets): a target scores half a count below its
    equals, so that ties rank it last."""

    def __init__(self, item_counts: np.ndarray | Tensor) -> None:  # (N + 1,), [0] is padding
        self.counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)[1:]
        self.num_items = len(self.counts)
        self.exact = BruteForceTopK(self._score_block, self.num_items, 1 << 24)

    def _score_block(self, targets: Tensor, start: int, end: int) -> Tensor:
        scores = self.counts[start:end].expand(len(targets), -1).clone()  # (B, n)
        if targets.ndim == 2:
            ids = torch.arange(start + 1, end + 1)
            is_target = (targets[:, :, None] == ids[None, None, :]).any(1)  # (B, n)
            scores -= 0.5 * is_target
        return scores

    def fetch(self, queries, k, exclude=None):
        return self.exact.fetch(queries, k)


def popularity_baseline(datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), exclude_history: bool = True) -> dict[str, float]:
    """Full-corpus metrics of the popularity baseline on the DataModule's val or test queries."""
    datamodule.setup("validate" if stage == "val" else "test")
    retriever = PopularityTopK(datamodule.visible_item_counts(stage))
    metric = RetrievalMetrics(ks, sync_on_compute=False)  # every query, in this process
    for batch in datamodule.query_loader(stage, sharded=False):
        _, ids = retriever.search(batch.targets, max(ks), batch.exclusion if exclude_history else None)
        metric.update(ids, batch.targets)
    return {f"{stage}/{name}": float(value) for name, value in metric.compute().items()}
