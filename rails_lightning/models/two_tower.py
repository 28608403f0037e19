"""Two-tower retrieval: the score is the cosine of a query vector and an item vector.

Shape legend: M queries, R items, D dimension, N corpus.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rails_lightning.models.base import RetrievalModule
from rails_lightning.retrieval.topk import (
    BruteForceTopK,
    FaissInnerProductTopK,
    TopKRetriever,
    faiss_available,
    faiss_gpus,
    inner_product_block,
)


class TwoTower(RetrievalModule):
    """Dot product of L2-normalised query and item embeddings (the baseline every paper compares to).

    Args:
        index: top-k backend for evaluation. ``auto`` uses FAISS on the CPU, or on the GPU when
            FAISS sees one, and the exact chunked torch top-k on the model's device otherwise
            (a GPU without FAISS-GPU, or no FAISS at all).
        item_chunk_size: corpus rows scored at once by the torch top-k.
        (All other arguments, from ``num_items`` to ``betas``: see ``RetrievalModule``.)
    """

    def __init__(
        self,
        *args: Any,
        index: Literal["auto", "faiss", "torch"] = "auto",
        item_chunk_size: int = 65536,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)

    def query_representation(self, states: Tensor) -> Tensor:
        return F.normalize(states, dim=-1)  # (..., D)

    def item_representation(self, item_ids: Tensor) -> Tensor:
        return F.normalize(self.item_vectors(item_ids), dim=-1)  # (..., D)

    def score_pairs(self, queries: Tensor, items: Tensor) -> Tensor:
        return (queries * items).sum(-1)  # (M,)

    def score_cross(self, queries: Tensor, items: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return queries @ items.T, {}  # (M, R)

    def build_retriever(self, items: Tensor) -> TopKRetriever:  # items: (N, D)
        backend = self.hparams.index
        if backend == "auto":
            on_cpu = items.device.type == "cpu"
            backend = "faiss" if faiss_available() and (on_cpu or faiss_gpus() > 0) else "torch"
        if backend == "faiss":
            return FaissInnerProductTopK(items)
        return BruteForceTopK(inner_product_block(items), len(items), self.hparams.item_chunk_size)
