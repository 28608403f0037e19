"""Top-k over the full corpus: the one interface the corpus callback uses, and its
inner-product / brute-force implementations.

Shape legend: B queries, N corpus items (ids 1..N; row r of an item matrix is item
id r + 1), K results, E excluded (query, item) pairs.

Exclusion (a user's history is not recommended back) is given in CSR form:
query i excludes ``exclude_items[exclude_offsets[i]:exclude_offsets[i + 1]]``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

NEG_INF = float("-inf")


class TopKRetriever(ABC):
    """Answers ``search(queries, k, exclude...) -> (scores (B, K), item ids (B, K))``, best first."""

    @abstractmethod
    def search(
        self, queries, k: int, exclude_offsets: Tensor | None = None, exclude_items: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


def exclusion_pairs(exclude_offsets: Tensor, exclude_items: Tensor) -> tuple[Tensor, Tensor]:
    """CSR exclusion -> (query row (E,), item id (E,)) pairs."""
    counts = exclude_offsets[1:] - exclude_offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return rows, exclude_items


def drop_excluded(
    scores: Tensor,  # (B, K') best first
    ids: Tensor,  # (B, K')
    k: int,
    exclude_offsets: Tensor | None,
    exclude_items: Tensor | None,
    num_items: int,
) -> tuple[Tensor, Tensor]:
    """Remove excluded and invalid (< 1) ids from over-fetched results, keep the first k per row."""
    bad = ids < 1
    if exclude_items is not None and exclude_items.numel():
        rows, items = exclusion_pairs(exclude_offsets.to(ids.device), exclude_items.to(ids.device))
        # One key per (row, item): a sorted membership test instead of a (B, K', E) comparison.
        row_index = torch.arange(ids.shape[0], device=ids.device)[:, None]
        keys = row_index * (num_items + 1) + ids.clamp_min(0)
        bad |= torch.isin(keys, rows * (num_items + 1) + items)
    # Stable sort moves dropped entries to the end while keeping the ranking of the rest.
    order = torch.argsort(bad.to(torch.int8), dim=1, stable=True)[:, :k]
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    kept_bad = bad.gather(1, order)
    return scores.masked_fill(kept_bad, NEG_INF), ids.masked_fill(kept_bad, 0)


class BruteForceTopK(TopKRetriever):
    """Exact top-k with any score function, chunked over items so memory stays ``B x chunk``.

    ``score_block(queries, start, end) -> (B, end - start)`` scores the queries against
    corpus rows ``start:end`` (item ids ``start + 1 .. end``). Runs on whatever device
    the tensors are on: this is the exact torch path used on GPUs without FAISS.
    """

    def __init__(self, score_block: Callable[[object, int, int], Tensor], num_items: int, item_chunk_size: int = 65536):
        self.score_block, self.num_items, self.item_chunk_size = score_block, num_items, item_chunk_size

    def search(self, queries, k, exclude_offsets=None, exclude_items=None):
        k = min(k, self.num_items)
        rows = items = None
        if exclude_items is not None and exclude_items.numel():
            rows, items = exclusion_pairs(exclude_offsets, exclude_items)
        best_scores = best_ids = None
        for start in range(0, self.num_items, self.item_chunk_size):
            end = min(start + self.item_chunk_size, self.num_items)
            scores = self.score_block(queries, start, end)  # (B, n)
            if rows is not None:
                rows, items = rows.to(scores.device), items.to(scores.device)
                inside = (items > start) & (items <= end)
                scores = scores.index_put((rows[inside], items[inside] - start - 1), torch.tensor(NEG_INF, device=scores.device))
            chunk_scores, chunk_cols = scores.topk(min(k, end - start), dim=1)
            chunk_ids = chunk_cols + start + 1
            if best_scores is None:
                best_scores, best_ids = chunk_scores, chunk_ids
            else:
                merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
                merged_ids = torch.cat([best_ids, chunk_ids], dim=1)
                best_scores, pick = merged_scores.topk(k, dim=1)
                best_ids = merged_ids.gather(1, pick)
        # Rows with fewer than k allowed items: mark the filler as "no item".
        return best_scores, best_ids.masked_fill(best_scores == NEG_INF, 0)


def inner_product_block(item_vectors: Tensor) -> Callable[[Tensor, int, int], Tensor]:
    """Score block for dot-product models: (B, D) @ (n, D)^T."""
    return lambda queries, start, end: queries @ item_vectors[start:end].T


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissInnerProductTopK(TopKRetriever):
    """Exact inner-product search with a FAISS flat index; on the GPU when FAISS sees one.

    FAISS cannot exclude per query, so it over-fetches ``k + (largest exclusion in the
    batch)`` results and drops the excluded ones: exact, because the excluded items are
    the only ones that can push an allowed item out of the top k.
    """

    def __init__(self, item_vectors: Tensor) -> None:  # (N, D)
        import faiss

        self.num_items, dim = item_vectors.shape
        index = faiss.IndexFlatIP(dim)
        # Only hand the index to a GPU when FAISS has one: without a GPU,
        # index_cpu_to_all_gpus silently returns an empty index.
        if faiss_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(item_vectors.detach().float().cpu().contiguous().numpy())
        self.index = index

    def search(self, queries, k, exclude_offsets=None, exclude_items=None):
        device = queries.device
        k = min(k, self.num_items)
        extra = 0
        if exclude_offsets is not None and len(exclude_offsets) > 1:
            extra = int((exclude_offsets[1:] - exclude_offsets[:-1]).max())
        fetch = min(k + extra, self.num_items)
        scores, rows = self.index.search(queries.detach().float().cpu().contiguous().numpy(), fetch)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(rows).long() + 1  # rows -1 (none) -> id 0
        scores, ids = drop_excluded(scores, ids, k, exclude_offsets, exclude_items, self.num_items)
        return scores.to(device), ids.to(device)
