"""Dot-product similarity: the two-tower baseline every paper compares against.

Shape legend: see ``rails_lightning.similarity.base``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rails_lightning.retrieval import (
    SearchOptions,
    TopKRetriever,
    approximate_inner_product_retriever,
    inner_product_retriever,
)
from rails_lightning.similarity.base import Auxiliary, Similarity


class DotProduct(Similarity):
    """Dot product of the query state and the item vector (cosine when normalised).

    Args:
        input_dim: D (passed by the model).
        num_users: number of users (passed by the model; unused).
        normalize: L2-normalise queries and items, so that the score is their cosine.
    """

    model_name = "TwoTower"
    scores_are_inner_products = True

    def __init__(self, input_dim: int, num_users: int, normalize: bool = True) -> None:
        super().__init__(input_dim, num_users)
        self.normalize = normalize

    def query_representation(self, states: Tensor, user_ids: Tensor) -> Tensor:
        return F.normalize(states, dim=-1) if self.normalize else states  # (..., D)

    def item_representation(self, vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1) if self.normalize else vectors  # (..., D)

    def score(self, queries: Tensor, items: Tensor, auxiliary: bool = False) -> tuple[Tensor, Auxiliary]:
        return torch.matmul(queries, items.transpose(1, 2)), Auxiliary()  # (G, Q, D) x (1 | G, C, D) -> (G, Q, C)

    def exact_retriever(self, items: Tensor, options: SearchOptions) -> TopKRetriever:  # items: (N, D)
        return inner_product_retriever(items, options)

    def offers_approximate_retriever(self, options: SearchOptions) -> bool:
        return options.index is not None

    def approximate_retriever(self, items: Tensor, options: SearchOptions) -> TopKRetriever | None:
        """The approximate FAISS index of ``options.index`` (e.g. ``IVF4096,Flat``, ``HNSW32``), trained on ``items``."""
        return approximate_inner_product_retriever(items, options)
