"""Two-tower retrieval: the score is the cosine of a query vector and an item vector.

Shape legend: M queries, R items, D dimension, N corpus.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rails_lightning.models.base import QueryEncoderFactory, RetrievalModule
from rails_lightning.models.encoders import SASRecEncoder
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
        (All other arguments: see ``RetrievalModule``.)
    """

    def __init__(
        self,
        num_items: int,
        num_users: int = 1,
        max_seq_len: int = 50,
        num_item_features: int = 0,
        item_dim: int = 64,
        query_encoder: QueryEncoderFactory = SASRecEncoder,
        num_negatives: int = 128,
        num_in_batch_negatives: int = 0,
        logq_correction: bool = True,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        index: Literal["auto", "faiss", "torch"] = "auto",
        item_chunk_size: int = 65536,
    ) -> None:
        super().__init__(
            num_items, num_users, max_seq_len, num_item_features, item_dim, query_encoder, num_negatives,
            num_in_batch_negatives, logq_correction, temperature, learn_temperature, learning_rate, weight_decay, betas,
        )

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
