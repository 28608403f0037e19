"""Top-k for Mixture-of-Logits: exact chunked scoring and the RAILS approximate algorithms.

Shape legend: B queries, N corpus items (ids 1..N; row r is item id r + 1), K results,
k' candidates per inner-product search, C candidates per query, P_Q / P_X query / item
components, P = P_Q * P_X, D_P component dimension.

All of them are ``TopKRetriever``s, built from the MoL similarity (anything with the
``cross`` / ``gathered`` methods of ``rails_lightning.models.mol.MixtureOfLogits``) and the
encoded corpus (``MoLItems``: components (N, P_X, D_P), gate logits (N, P)); queries are
``MoLQueries`` (components (B, P_Q, D_P), gate logits (B, P)).

* ``MoLExactTopK``: the full MoL score of every (query, item), chunked over items so that
  B x chunk x P stays bounded; the reference the approximate ones are measured against.
* ``PerEmbeddingTopK``: for each of the P_Q x P_X (query component, item component) pairs,
  the top k' items by that pair's inner product; union; re-rank with the full MoL score.
* ``AveragedEmbeddingTopK``: one inner-product search of the mean query component against
  the mean item component (the MoL score with uniform gates, up to a constant), top k';
  re-rank with the full MoL score.
* ``CombinedTopK``: the union of the two candidate sets, re-ranked.

In YAML the approximate ones are chosen by ``class_path`` with their own options only;
the model passes the similarity and the corpus:

    approximate_topk:
      class_path: rails_lightning.retrieval.mol_topk.CombinedTopK
      init_args: {k_prime: 64, averaged_k_prime: 1024}

Candidate searches exclude the user's history (so k' counts allowed items); the final
ranking is exclusion-safe as well. Results are best first, ids 1..N, 0 = no item.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Protocol

import torch
from torch import Tensor

from rails_lightning.retrieval.topk import (
    NEG_INF,
    BruteForceTopK,
    FaissInnerProductTopK,
    TopKRetriever,
    drop_excluded,
    faiss_available,
    faiss_gpus,
    inner_product_block,
)


class MixtureScorer(Protocol):
    """What the top-k routines need from the MoL similarity."""

    num_components: int

    def cross(self, queries: Any, items: Any) -> tuple[Tensor, Tensor]: ...  # (B,..) x (n,..) -> (B, n), gates

    def gathered(self, queries: Any, items: Any) -> tuple[Tensor, Tensor]: ...  # (B,..) x (B, C,..) -> (B, C), gates


def select_items(items: Any, index: Any) -> Any:
    """Index every field of an item representation (a NamedTuple of tensors) by the same rows."""
    return type(items)(*(field[index] for field in items))


def repeat_exclusion(exclude_offsets: Tensor | None, exclude_items: Tensor | None, times: int):
    """CSR exclusion of B queries -> the same for B * times rows (row b * times + t excludes what b excludes)."""
    if exclude_items is None or exclude_offsets is None:
        return None, None
    counts = (exclude_offsets[1:] - exclude_offsets[:-1]).repeat_interleave(times)  # (B * times,)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    starts = exclude_offsets[:-1].repeat_interleave(times)  # where each new row's list starts in exclude_items
    within = torch.arange(int(offsets[-1]), device=counts.device) - offsets[:-1].repeat_interleave(counts)
    return offsets, exclude_items[starts.repeat_interleave(counts) + within]


def _rows_per_block(rows: int, width: int, block_elements: int, cap: int, at_least: int = 1) -> int:
    """How many items (or candidates) to score at once so that rows x block x width <= block_elements."""
    return max(at_least, min(cap, block_elements // max(1, rows * width)))


def _use_faiss(use_faiss: bool | None, device: torch.device) -> bool:
    if use_faiss is None:  # FAISS on the CPU (or on a GPU it sees); torch top-k on a GPU FAISS lacks
        return faiss_available() and (device.type == "cpu" or faiss_gpus() > 0)
    return use_faiss


class MoLExactTopK(TopKRetriever):
    """Exact MoL top-k over the full corpus, on the corpus' device (the GPU path without FAISS).

    Args:
        similarity: the MoL similarity.
        items: the encoded corpus (``MoLItems``).
        item_chunk_size: at most this many items are scored at once.
        score_block_elements: the chunk also shrinks so that B x chunk x P stays below this;
            peak memory of a search is about 20 bytes per element on top of the corpus.
    """

    def __init__(self, similarity: MixtureScorer, items: Any, item_chunk_size: int = 65536, score_block_elements: int = 1 << 22):
        self.similarity, self.items = similarity, items
        self.num_items = items.components.shape[0]
        self.item_chunk_size, self.score_block_elements = item_chunk_size, score_block_elements

    def score_block(self, queries: Any, start: int, end: int) -> Tensor:
        """(B, end - start) MoL scores of the queries against corpus rows start:end."""
        return self.similarity.cross(queries, select_items(self.items, slice(start, end)))[0]

    def search(self, queries, k, exclude_offsets=None, exclude_items=None):
        rows = queries.components.shape[0]
        # BruteForceTopK needs chunks of at least k items.
        chunk = _rows_per_block(rows, self.similarity.num_components, self.score_block_elements, self.item_chunk_size, k)
        return BruteForceTopK(self.score_block, self.num_items, chunk).search(queries, k, exclude_offsets, exclude_items)


class RerankedTopK(TopKRetriever):
    """Base of the approximate algorithms: candidate ids from inner-product searches, re-ranked
    with the full MoL score. Subclasses define ``candidates``."""

    def __init__(self, similarity: MixtureScorer, items: Any, score_block_elements: int = 1 << 22) -> None:
        self.similarity, self.items = similarity, items
        self.num_items = items.components.shape[0]
        self.score_block_elements = score_block_elements

    @abstractmethod
    def candidates(self, queries: Any, exclude_offsets: Tensor | None, exclude_items: Tensor | None) -> Tensor:
        """Candidate item ids (B, C); 0 = none; duplicates allowed."""

    def search(self, queries, k, exclude_offsets=None, exclude_items=None):
        return self.rerank(queries, self.candidates(queries, exclude_offsets, exclude_items), k, exclude_offsets, exclude_items)

    def rerank(self, queries: Any, ids: Tensor, k: int, exclude_offsets=None, exclude_items=None) -> tuple[Tensor, Tensor]:
        """Score candidate ids (B, C) with the full MoL score; the best k (B, K), duplicates and excluded dropped."""
        k = min(k, self.num_items)
        ids, _ = ids.sort(dim=1)
        duplicate = torch.zeros_like(ids, dtype=torch.bool)
        duplicate[:, 1:] = ids[:, 1:] == ids[:, :-1]
        ids, _ = ids.masked_fill(duplicate, 0).sort(dim=1)  # duplicates and "none" (0) first
        ids = ids[:, int((ids == 0).sum(1).min()) :]  # (B, C): no column that is empty in every row
        B, C = ids.shape
        P_X, D_P = self.items.components.shape[1:]
        width = max(self.similarity.num_components, P_X * D_P)  # the gathered components dominate
        step = _rows_per_block(B, width, self.score_block_elements, C)
        parts = []
        for start in range(0, C, step):
            block = ids[:, start : start + step]  # (B, c)
            gathered = select_items(self.items, (block - 1).clamp_min(0))  # components (B, c, P_X, D_P)
            parts.append(self.similarity.gathered(queries, gathered)[0])  # (B, c)
        scores = torch.cat(parts, dim=1).masked_fill(ids < 1, NEG_INF)  # (B, C)
        extra = 0
        if exclude_offsets is not None and exclude_items is not None and len(exclude_offsets) > 1:
            extra = int((exclude_offsets[1:] - exclude_offsets[:-1]).max())
        scores, order = scores.topk(min(C, k + extra), dim=1)
        scores, ids = drop_excluded(scores, ids.gather(1, order), k, exclude_offsets, exclude_items, self.num_items)
        if ids.shape[1] < k:  # fewer candidates than k: pad with "no item"
            pad = k - ids.shape[1]
            scores = torch.cat([scores, scores.new_full((B, pad), NEG_INF)], dim=1)
            ids = torch.cat([ids, ids.new_zeros(B, pad)], dim=1)
        return scores, ids.masked_fill(scores == NEG_INF, 0)


def _inner_product_retriever(vectors: Tensor, use_faiss: bool | None, item_chunk_size: int) -> TopKRetriever:
    """Exact inner-product top-k over (N, D) vectors: a FAISS flat index or the chunked torch top-k."""
    if _use_faiss(use_faiss, vectors.device):
        return FaissInnerProductTopK(vectors)
    return BruteForceTopK(inner_product_block(vectors.contiguous()), len(vectors), item_chunk_size)


class PerEmbeddingTopK(RerankedTopK):
    """RAILS per-embedding top-k: the top k' items of every (query component, item component) pair
    by inner product, their union re-ranked with the MoL score. At most P x k' candidates.

    Args:
        similarity: the MoL similarity (passed by the model).
        items: the encoded corpus (passed by the model).
        k_prime: items retrieved per component pair.
        use_faiss: FAISS flat indexes (one per item component) instead of one batched torch
            search over all pairs; None picks FAISS on the CPU when installed.
        item_chunk_size: corpus rows per torch search block (also bounded by ``score_block_elements``).
        score_block_elements: bounds the (query, item, component) block of the torch search and of the re-ranking.
    """

    def __init__(
        self,
        similarity: MixtureScorer,
        items: Any,
        k_prime: int = 128,
        use_faiss: bool | None = None,
        item_chunk_size: int = 65536,
        score_block_elements: int = 1 << 22,
    ) -> None:
        super().__init__(similarity, items, score_block_elements)
        self.k_prime, self.item_chunk_size = k_prime, item_chunk_size
        components = items.components  # (N, P_X, D_P)
        self.num_item_components = components.shape[1]
        self.uses_faiss = _use_faiss(use_faiss, components.device)
        self.faiss = None
        if self.uses_faiss:
            self.faiss = [FaissInnerProductTopK(components[:, j]) for j in range(self.num_item_components)]
        else:
            self.flat_components = components.reshape(-1, components.shape[-1])  # (N * P_X, D_P), row n * P_X + j

    def _pair_block(self, query_components: Tensor, start: int, end: int) -> Tensor:
        """(B * P_Q, D_P) query components x corpus rows start:end -> (B * P, end - start) pair scores."""
        P_X = self.num_item_components
        scores = query_components @ self.flat_components[start * P_X : end * P_X].T  # (B * P_Q, n * P_X)
        return scores.view(scores.shape[0], end - start, P_X).transpose(1, 2).reshape(-1, end - start)

    def candidates(self, queries, exclude_offsets, exclude_items):
        B, P_Q, D_P = queries.components.shape
        P_X, k = self.num_item_components, min(self.k_prime, self.num_items)
        query_components = queries.components.reshape(B * P_Q, D_P)  # row b * P_Q + i
        if self.faiss is not None:
            excluded = repeat_exclusion(exclude_offsets, exclude_items, P_Q)
            ids = torch.cat([index.search(query_components, k, *excluded)[1].view(B, P_Q * k) for index in self.faiss], dim=1)
        else:
            excluded = repeat_exclusion(exclude_offsets, exclude_items, P_Q * P_X)
            chunk = _rows_per_block(B * P_Q * P_X, 1, self.score_block_elements, self.item_chunk_size, k)
            search = BruteForceTopK(self._pair_block, self.num_items, chunk)
            ids = search.search(query_components, k, *excluded)[1].view(B, P_Q * P_X * k)
        return ids.to(queries.components.device)  # (B, P * k')


class AveragedEmbeddingTopK(RerankedTopK):
    """RAILS averaged-embedding top-k: one inner-product search of the mean query component
    against the mean item component (the uniform-gate MoL score up to the constant P), top k',
    re-ranked with the MoL score.

    Args:
        similarity: the MoL similarity (passed by the model).
        items: the encoded corpus (passed by the model).
        k_prime: candidates retrieved by the averaged search.
        use_faiss: a FAISS flat index instead of the chunked torch top-k; None picks FAISS on the CPU when installed.
        item_chunk_size: corpus rows per torch search block.
        score_block_elements: bounds the re-ranking block.
    """

    def __init__(
        self,
        similarity: MixtureScorer,
        items: Any,
        k_prime: int = 1024,
        use_faiss: bool | None = None,
        item_chunk_size: int = 65536,
        score_block_elements: int = 1 << 22,
    ) -> None:
        super().__init__(similarity, items, score_block_elements)
        self.k_prime = k_prime
        self.uses_faiss = _use_faiss(use_faiss, items.components.device)
        self.index = _inner_product_retriever(items.components.mean(1), self.uses_faiss, item_chunk_size)  # over (N, D_P)

    def candidates(self, queries, exclude_offsets, exclude_items):
        k = min(self.k_prime, self.num_items)
        ids = self.index.search(queries.components.mean(1), k, exclude_offsets, exclude_items)[1]  # (B, k')
        return ids.to(queries.components.device)


class CombinedTopK(RerankedTopK):
    """The union of the per-embedding and the averaged-embedding candidates, re-ranked with the MoL score.

    Args:
        similarity: the MoL similarity (passed by the model).
        items: the encoded corpus (passed by the model).
        k_prime: items retrieved per component pair by the per-embedding search.
        averaged_k_prime: candidates retrieved by the averaged-embedding search.
        use_faiss: FAISS flat indexes instead of torch searches; None picks FAISS on the CPU when installed.
        item_chunk_size: corpus rows per torch search block.
        score_block_elements: bounds the torch search and re-ranking blocks.
    """

    def __init__(
        self,
        similarity: MixtureScorer,
        items: Any,
        k_prime: int = 64,
        averaged_k_prime: int = 1024,
        use_faiss: bool | None = None,
        item_chunk_size: int = 65536,
        score_block_elements: int = 1 << 22,
    ) -> None:
        super().__init__(similarity, items, score_block_elements)
        self.per_embedding = PerEmbeddingTopK(similarity, items, k_prime, use_faiss, item_chunk_size, score_block_elements)
        self.averaged = AveragedEmbeddingTopK(similarity, items, averaged_k_prime, use_faiss, item_chunk_size, score_block_elements)
        self.uses_faiss = self.per_embedding.uses_faiss

    def candidates(self, queries, exclude_offsets, exclude_items):
        return torch.cat(
            [
                self.per_embedding.candidates(queries, exclude_offsets, exclude_items),
                self.averaged.candidates(queries, exclude_offsets, exclude_items),
            ],
            dim=1,
        )  # (B, P * k' + averaged k')
