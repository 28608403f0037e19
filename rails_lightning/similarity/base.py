"""The contract of a similarity: heads from encoder states / item vectors to representations, pair and
cross scores with typed auxiliary outputs, and the top-k retrievers over an encoded corpus.

Shape legend (shared by every similarity): D input dimension (the query encoder's and the item
tower's width), M queries, R items scored against every query, N corpus size.

A similarity is built by ``RetrievalModule`` from a factory (``class_path`` + ``init_args`` in YAML)
with the two data-dependent sizes: ``Similarity(input_dim, num_users, **own options)``.
Representations are whatever the similarity needs (a tensor, or a NamedTuple of tensors whose
first dimensions index queries / items).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from rails_lightning.retrieval import SearchOptions, TopKRetriever


@dataclass
class Auxiliary:
    """What a cross score returns besides the scores.

    ``losses`` are added to the training loss (and logged as ``train/<name>``); ``statistics`` are
    only logged (``train/<name>``), detached.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    statistics: dict[str, Tensor] = field(default_factory=dict)


class Similarity(nn.Module, ABC):
    """Base class of every similarity.

    ``model_name`` is the name users know a model with this similarity by (run directories, reports).
    ``scores_are_inner_products`` says whether a score is the inner product of the query and item
    representations, so that inner-product indexes (FAISS factory strings) can search the corpus.
    """

    model_name: ClassVar[str]
    scores_are_inner_products: ClassVar[bool] = False

    def __init__(self, input_dim: int, num_users: int) -> None:
        super().__init__()
        self.input_dim, self.num_users = input_dim, num_users

    @abstractmethod
    def query_representation(self, states: Tensor, user_ids: Tensor) -> Any:
        """Encoder states (..., D) of users (...,) -> query representations."""

    @abstractmethod
    def item_representation(self, vectors: Tensor) -> Any:
        """Item-tower vectors (..., D) -> item representations."""

    @abstractmethod
    def pair_scores(self, queries: Any, items: Any) -> Tensor:
        """M queries x their own M items -> (M,)."""

    @abstractmethod
    def cross_scores(self, queries: Any, items: Any) -> tuple[Tensor, Auxiliary]:
        """M queries x R items shared by all -> scores (M, R) and the auxiliary outputs of training."""

    @abstractmethod
    def grouped_scores(self, queries: Any, items: Any) -> tuple[Tensor, Auxiliary]:
        """G groups of Q queries x the C items of their group (queries with leading dims (G, Q), items (G, C))
        -> scores (G, Q, C) and the auxiliary outputs of training. Negatives drawn per query are G = M groups
        of one query; negatives drawn per training sequence are the sequence's L positions x its items."""

    @abstractmethod
    def exact_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever:
        """Exact top-k over an encoded corpus (ids 1..N)."""

    def offers_approximate_retriever(self, options: SearchOptions) -> bool:
        """Whether ``approximate_retriever(items, options)`` returns a retriever (and its metrics are logged)."""
        return False

    def approximate_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever | None:
        """A fast approximate top-k, evaluated beside the exact one; None when the similarity has none."""
        return None
