"""The contract of a similarity: heads from encoder states / item vectors to representations, one score function
for every layout of queries and items, with typed auxiliary outputs, and the top-k retrievers over an encoded corpus.

Shape legend (shared by every similarity): D input dimension (the query encoder's and the item
tower's width), G groups of Q queries scored against C items each, M training queries, R negatives, B queries,
L sequence length, N corpus size.

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


def with_group_dim(representation: Any, dim: int) -> Any:
    """A representation (a tensor, or a NamedTuple of tensors) with a dimension of 1 inserted at ``dim`` of every
    field: M queries as one group (``dim`` 0) or as M groups of one (``dim`` 1), as ``Similarity.score`` takes them."""
    if isinstance(representation, Tensor):
        return representation.unsqueeze(dim)
    return type(representation)(*(field.unsqueeze(dim) for field in representation))


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
    def score(self, queries: Any, items: Any, auxiliary: bool = False) -> tuple[Tensor, Auxiliary]:
        """G groups of Q queries (leading dims (G, Q)) x C items per group, shared by every group (leading dims
        (1, C)) or each group's own ((G, C)) -> scores (G, Q, C), and with ``auxiliary`` the auxiliary outputs of
        training over these pairs (empty otherwise). Training scores its positives as (M, 1) x (M, 1), negatives
        shared by the batch as (1, M) x (1, R), drawn per query as (M, 1) x (M, R) and per sequence as (B, L) x (B, R)
        (each item encoded once per sequence, not once per position); retrieval scores a corpus block as (1, B) x
        (1, n) and re-ranks candidates as (B, 1) x (B, C)."""

    @abstractmethod
    def exact_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever:
        """Exact top-k over an encoded corpus (ids 1..N)."""

    def offers_approximate_retriever(self, options: SearchOptions) -> bool:
        """Whether ``approximate_retriever(items, options)`` returns a retriever (and its metrics are logged)."""
        return False

    def approximate_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever | None:
        """A fast approximate top-k, evaluated beside the exact one; None when the similarity has none."""
        return None
