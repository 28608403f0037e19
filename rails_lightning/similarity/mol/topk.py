"""Top-k for Mixture-of-Logits: exact chunked scoring and the RAILS approximate algorithms. They are part of the MoL
package and built on the generic retrieval machinery (``rails_lightning.retrieval``), which knows nothing of MoL.

Shape legend: B queries, N corpus items (ids 1..N; row r is item id r + 1), K results,
k' candidates per inner-product search, C candidates per query, P_Q / P_X query / item
components, P = P_Q * P_X, D_P component dimension.

All of them are ``TopKRetriever``s built from the MoL similarity (anything with the ``score`` method of
``rails_lightning.similarity.MixtureOfLogits``, which every score below goes through), the encoded corpus
(``MoLItems``: components (N, P_X, D_P), gate logits (N, P)) and the caller's ``SearchOptions``;
queries are ``MoLQueries`` (components (B, P_Q, D_P), gate logits (B, P)). History exclusion and
over-fetching are ``TopKRetriever.search``'s, as for every retriever.

* ``MoLExactTopK``: the full MoL score of every (query, item), chunked over items; the reference
  the approximate ones are measured against.
* ``PerEmbeddingTopK``: for each of the P_Q x P_X (query component, item component) pairs, the top
  k' items by that pair's inner product; union; re-rank with the full MoL score.
* ``AveragedEmbeddingTopK``: one inner-product search of the mean query component against the
  mean item component (the MoL score with uniform gates, up to a constant), top k'; re-rank.
* ``CombinedTopK``: the union of the two candidate sets, re-ranked.

In YAML the approximate ones are chosen by ``class_path`` with their own options only; the
similarity passes itself, the corpus and the search options:

    approximate_topk:
      class_path: rails_lightning.similarity.mol.topk.CombinedTopK
      init_args: {k_prime: 64, averaged_k_prime: 1024}
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Protocol

import torch
from torch import Tensor

from rails_lightning.retrieval.backend import SearchOptions, inner_product_retriever, uses_faiss
from rails_lightning.retrieval.topk import NEG_INF, BruteForceTopK, Exclusion, TopKRetriever, unique_ids
from rails_lightning.similarity.base import with_group_dim
from rails_lightning.similarity.mol.heads import MoLItems, MoLQueries


class MixtureScorer(Protocol):
    """What the top-k routines need from the MoL similarity (``model.MixtureOfLogits``, which builds them: a protocol
    rather than an import, so that the package's modules depend one way, the model on these routines)."""

    num_components: int

    def score(self, queries: MoLQueries, items: MoLItems, auxiliary: bool = False) -> tuple[Tensor, Any]: ...  # (G, Q,..) x (1 | G, C,..) -> (G, Q, C)


def select_items(items: MoLItems, index: Any) -> MoLItems:
    """Index every field of the items by the same rows."""
    return MoLItems(*(field[index] for field in items))


class MoLExactTopK(TopKRetriever):
    """Exact MoL top-k over the full corpus, on the corpus' device (the GPU path without FAISS).

    Memory: at most ``options.score_block_elements`` (query, item, component) values at once.
    """

    def __init__(self, similarity: MixtureScorer, items: MoLItems, options: SearchOptions) -> None:
        self.similarity, self.items = similarity, items
        self.num_items = items.components.shape[0]
        self.exact = BruteForceTopK(self.score_block, self.num_items, options.score_block_elements, similarity.num_components)

    def score_block(self, queries: MoLQueries, start: int, end: int) -> Tensor:
        """(B, end - start) MoL scores of the queries against corpus rows start:end."""
        block = select_items(self.items, slice(start, end))
        return self.similarity.score(with_group_dim(queries, 0), with_group_dim(block, 0))[0][0]  # one group: (1, B) x (1, n)

    def fetch(self, queries, k, exclude=None):
        return self.exact.fetch(queries, k)


class RerankedTopK(TopKRetriever):
    """Base of the approximate algorithms: candidate ids from inner-product searches, re-ranked
    with the full MoL score. Subclasses define ``candidates``."""

    def __init__(self, similarity: MixtureScorer, items: MoLItems, options: SearchOptions) -> None:
        self.similarity, self.items, self.options = similarity, items, options
        self.num_items = items.components.shape[0]

    @abstractmethod
    def candidates(self, queries: MoLQueries, exclude: Exclusion | None) -> Tensor:
        """Candidate item ids (B, C); 0 = none; duplicates allowed."""

    def fetch(self, queries, k, exclude=None):
        return self.rerank(queries, self.candidates(queries, exclude), k)

    def rerank(self, queries: MoLQueries, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Score candidate ids (B, C) with the full MoL score; the best k (B, <= k), each id once."""
        ids, _ = unique_ids(ids).sort(dim=1)  # repeats and "none" (0) first
        ids = ids[:, int((ids == 0).sum(1).min()) :]  # (B, C): no column that is empty in every row
        B, C = ids.shape
        P_X, D_P = self.items.components.shape[1:]
        width = max(self.similarity.num_components, P_X * D_P)  # the gathered components dominate
        step = max(1, min(C, self.options.score_block_elements // max(1, B * width)))
        parts = []
        for start in range(0, C, step):
            block = ids[:, start : start + step]  # (B, c)
            gathered = select_items(self.items, (block - 1).clamp_min(0))  # components (B, c, P_X, D_P)
            parts.append(self.similarity.score(with_group_dim(queries, 1), gathered)[0][:, 0])  # B groups of one query: (B, c)
        scores = torch.cat(parts, dim=1).masked_fill(ids < 1, NEG_INF)  # (B, C)
        scores, order = scores.topk(min(C, k), dim=1)
        return scores, ids.gather(1, order)


class PerEmbeddingTopK(RerankedTopK):
    """RAILS per-embedding top-k: the top k' items of every (query component, item component) pair
    by inner product, their union re-ranked with the MoL score. At most P x k' candidates.

    Args:
        similarity: the MoL similarity (passed by it).
        items: the encoded corpus (passed by the similarity).
        options: backend and memory bound of the searches (passed by the caller).
        k_prime: items retrieved per component pair.
    """

    def __init__(self, similarity: MixtureScorer, items: MoLItems, options: SearchOptions, k_prime: int = 128) -> None:
        super().__init__(similarity, items, options)
        self.k_prime = k_prime
        components = items.components  # (N, P_X, D_P)
        self.num_item_components = components.shape[1]
        self.faiss = None
        if uses_faiss(options.backend, components.device):
            self.faiss = [inner_product_retriever(components[:, j], options) for j in range(self.num_item_components)]
        else:
            self.flat_components = components.reshape(-1, components.shape[-1])  # (N * P_X, D_P), row n * P_X + j

    def _pair_block(self, query_components: Tensor, start: int, end: int) -> Tensor:
        """(B * P_Q, D_P) query components x corpus rows start:end -> (B * P, end - start) pair scores."""
        P_X = self.num_item_components
        scores = query_components @ self.flat_components[start * P_X : end * P_X].T  # (B * P_Q, n * P_X)
        return scores.view(scores.shape[0], end - start, P_X).transpose(1, 2).reshape(-1, end - start)

    def candidates(self, queries, exclude):
        B, P_Q, D_P = queries.components.shape
        P_X, k = self.num_item_components, min(self.k_prime, self.num_items)
        query_components = queries.components.reshape(B * P_Q, D_P)  # row b * P_Q + i
        if self.faiss is not None:
            excluded = None if exclude is None else exclude.repeat(P_Q)
            ids = torch.cat([index.search(query_components, k, excluded)[1].view(B, P_Q * k) for index in self.faiss], dim=1)
        else:
            excluded = None if exclude is None else exclude.repeat(P_Q * P_X)
            # Rows of the pair search are (query, component pair): B * P_Q queries, P_X values per item.
            search = BruteForceTopK(self._pair_block, self.num_items, self.options.score_block_elements, P_X)
            ids = search.search(query_components, k, excluded)[1].view(B, P_Q * P_X * k)
        return ids.to(queries.components.device)  # (B, P * k')


class AveragedEmbeddingTopK(RerankedTopK):
    """RAILS averaged-embedding top-k: one inner-product search of the mean query component
    against the mean item component (the uniform-gate MoL score up to the constant P), top k',
    re-ranked with the MoL score.

    Args:
        similarity: the MoL similarity (passed by it).
        items: the encoded corpus (passed by the similarity).
        options: backend and memory bound of the searches (passed by the caller).
        k_prime: candidates retrieved by the averaged search.
    """

    def __init__(self, similarity: MixtureScorer, items: MoLItems, options: SearchOptions, k_prime: int = 1024) -> None:
        super().__init__(similarity, items, options)
        self.k_prime = k_prime
        self.index = inner_product_retriever(items.components.mean(1), options)  # over (N, D_P)

    def candidates(self, queries, exclude):
        k = min(self.k_prime, self.num_items)
        ids = self.index.search(queries.components.mean(1), k, exclude)[1]  # (B, k')
        return ids.to(queries.components.device)


class CombinedTopK(RerankedTopK):
    """The union of the per-embedding and the averaged-embedding candidates, re-ranked with the MoL score.

    Args:
        similarity: the MoL similarity (passed by it).
        items: the encoded corpus (passed by the similarity).
        options: backend and memory bound of the searches (passed by the caller).
        k_prime: items retrieved per component pair by the per-embedding search.
        averaged_k_prime: candidates retrieved by the averaged-embedding search.
    """

    def __init__(
        self, similarity: MixtureScorer, items: MoLItems, options: SearchOptions, k_prime: int = 64, averaged_k_prime: int = 1024
    ) -> None:
        super().__init__(similarity, items, options)
        self.per_embedding = PerEmbeddingTopK(similarity, items, options, k_prime)
        self.averaged = AveragedEmbeddingTopK(similarity, items, options, averaged_k_prime)

    def candidates(self, queries, exclude):
        per_embedding = self.per_embedding.candidates(queries, exclude)  # (B, P * k')
        return torch.cat([per_embedding, self.averaged.candidates(queries, exclude)], dim=1)  # (B, P * k' + averaged k')
