"""The top-k interface every retriever implements, with the one place that excludes a user's history.

Shape legend: B queries, N corpus items (ids 1..N; row r of an item matrix is item id r + 1),
K results, K' fetched results (K plus room for excluded items), E excluded (query, item) pairs.

A retriever only says how to *fetch* its best K' items per query (``fetch``). ``search`` wraps
every retriever the same way: it over-fetches by the largest exclusion list in the batch, drops
excluded and invalid ids, and keeps the first K. That is exact for any retriever whose fetch is
exact, because the excluded items are the only ones that can push an allowed item out of the
top K. Results are best first; id 0 with score -inf marks "no item" (fewer than K allowed items).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


class Exclusion(NamedTuple):
    """Items each query must not get back, in CSR form: query i excludes ``items[offsets[i]:offsets[i + 1]]``."""

    offsets: Tensor  # (B + 1,) int64
    items: Tensor  # (E,) int64

    def max_per_query(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1]).max()) if len(self.offsets) > 1 else 0

    def pairs(self) -> tuple[Tensor, Tensor]:
        """(query row (E,), item id (E,)) of every excluded pair."""
        counts = self.offsets[1:] - self.offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        return rows, self.items

    def repeat(self, times: int) -> Exclusion:
        """The exclusion of B queries for B * times rows: row b * times + t excludes what query b excludes."""
        counts = (self.offsets[1:] - self.offsets[:-1]).repeat_interleave(times)  # (B * times,)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        starts = self.offsets[:-1].repeat_interleave(times)  # where each new row's list starts in items
        within = torch.arange(int(offsets[-1]), device=counts.device) - offsets[:-1].repeat_interleave(counts)
        return Exclusion(offsets, self.items[starts.repeat_interleave(counts) + within])

    def to(self, device: torch.device | str) -> Exclusion:
        return Exclusion(self.offsets.to(device), self.items.to(device))


def keep_allowed(
    scores: Tensor, ids: Tensor, k: int, exclude: Exclusion | None, num_items: int, dense_limit: int = 1 << 25
) -> tuple[Tensor, Tensor]:
    """Fetched results (B, K') best first -> the first k allowed ones (B, k): excluded ids and ids outside 1..N dropped.

    Exclusions are looked up in a (B, N + 1) boolean table while it has at most ``dense_limit`` entries, a few times
    faster than the sorted membership test used beyond (the MoL candidate searches call this with B x P_Q rows)."""
    bad = (ids < 1) | (ids > num_items) | (scores == NEG_INF)
    if exclude is not None and exclude.items.numel():
        rows, items = exclude.to(ids.device).pairs()
        # One key per (row, item): a table lookup or a sorted membership test, not a (B, K', E) comparison.
        row_index = torch.arange(ids.shape[0], device=ids.device)[:, None]
        keys = row_index * (num_items + 1) + ids.clamp(0, num_items)
        excluded = rows * (num_items + 1) + items
        if ids.shape[0] * (num_items + 1) <= dense_limit:
            table = torch.zeros(ids.shape[0] * (num_items + 1), dtype=torch.bool, device=ids.device)
            table[excluded] = True
            bad |= table[keys]
        else:
            bad |= torch.isin(keys, excluded)
    # A stable sort moves dropped entries to the end while keeping the ranking of the rest.
    order = torch.argsort(bad.to(torch.int8), dim=1, stable=True)[:, :k]
    scores, ids, kept_bad = scores.gather(1, order), ids.gather(1, order), bad.gather(1, order)
    if ids.shape[1] < k:  # fewer fetched than k (a small candidate set): pad with "no item"
        pad = k - ids.shape[1]
        scores = torch.cat([scores, scores.new_full((len(scores), pad), NEG_INF)], dim=1)
        ids = torch.cat([ids, ids.new_zeros(len(ids), pad)], dim=1)
        kept_bad = torch.cat([kept_bad, kept_bad.new_ones(len(kept_bad), pad)], dim=1)
    return scores.masked_fill(kept_bad, NEG_INF), ids.masked_fill(kept_bad, 0)


def unique_ids(ids: Tensor) -> Tensor:
    """Ids (B, C) -> the same ids sorted per row with every repeat (and padding) set to 0, so each id counts once."""
    ids, _ = ids.sort(dim=1)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, 0)


class TopKRetriever(ABC):
    """``search(queries, k, exclude) -> (scores (B, k), item ids (B, k))``, best first, history excluded.

    Subclasses set ``num_items`` and implement ``fetch``.
    """

    num_items: int

    @abstractmethod
    def fetch(self, queries: Any, k: int, exclude: Exclusion | None) -> tuple[Tensor, Tensor]:
        """The best ``k`` items per query (B, <= k), best first. ``exclude`` is a hint a retriever may use
        (e.g. so that candidate searches count allowed items only); ``search`` applies it in any case."""

    def search(self, queries: Any, k: int, exclude: Exclusion | None = None) -> tuple[Tensor, Tensor]:
        """Always (B, k): a corpus smaller than k leaves "no item" (id 0, score -inf) at the end."""
        extra = 0 if exclude is None else exclude.max_per_query()
        fetch = min(k + extra, self.num_items)
        if fetch == 0:  # an empty corpus: nothing but "no item"
            num_queries = len(queries) if isinstance(queries, Tensor) else len(queries[0])
            empty = torch.empty(num_queries, 0)
            return keep_allowed(empty, empty.long(), k, None, self.num_items)
        scores, ids = self.fetch(queries, fetch, exclude)
        return keep_allowed(scores, ids, k, exclude, self.num_items)


class SubsetTopK(TopKRetriever):
    """Top-k among some corpus items only: ``inner`` searches their representations alone (its ids 1..S are the
    positions of ``item_ids``) and its results are mapped back to corpus ids; exclusions are mapped the other way
    (an excluded item outside the subset cannot come back anyway). Cold-start evaluation ranks the cold items
    among themselves with it, and mining draws hard negatives from the items training may see.

    Args:
        inner: a retriever over the S items' representations, in the order of ``item_ids``.
        item_ids: (S,) the corpus ids of those items.
        num_items: N, the corpus size (ids 1..N).
    """

    def __init__(self, inner: TopKRetriever, item_ids: Tensor, num_items: int) -> None:
        self.inner, self.num_items = inner, num_items
        self.corpus_id = torch.cat([item_ids.new_zeros(1), item_ids])  # (S + 1,) subset id -> corpus id, 0 -> 0
        self.subset_id = item_ids.new_zeros(num_items + 1)  # (N + 1,) corpus id -> subset id, 0 outside it
        self.subset_id[item_ids] = torch.arange(1, len(item_ids) + 1, device=item_ids.device)

    def fetch(self, queries, k, exclude=None):
        inner_exclude = None
        if exclude is not None:
            rows, items = exclude.to(self.subset_id.device).pairs()
            mapped = self.subset_id[items]  # (E,)
            kept = mapped > 0
            counts = torch.bincount(rows[kept], minlength=len(exclude.offsets) - 1)
            inner_exclude = Exclusion(torch.cat([counts.new_zeros(1), counts.cumsum(0)]), mapped[kept])
        scores, ids = self.inner.search(queries, min(k, self.inner.num_items), inner_exclude)
        return scores, self.corpus_id.to(ids.device)[ids]


ScoreBlock = Callable[[Any, int, int], Tensor]


class BruteForceTopK(TopKRetriever):
    """Exact top-k with any score function, chunked over items so that memory stays bounded.

    ``score_block(queries, start, end) -> (B, end - start)`` scores the queries against corpus rows
    ``start:end`` (item ids ``start + 1 .. end``). A chunk holds at most ``block_elements`` values of
    ``B x items x width`` (``width``: values per (query, item) pair, e.g. MoL's P gate logits). Runs
    on whatever device the tensors are on: this is the exact torch path used on GPUs without FAISS.
    """

    def __init__(self, score_block: ScoreBlock, num_items: int, block_elements: int, width: int = 1) -> None:
        self.score_block, self.num_items = score_block, num_items
        self.block_elements, self.width = block_elements, width

    def fetch(self, queries, k, exclude=None):
        num_queries = len(queries) if isinstance(queries, Tensor) else len(queries[0])
        chunk = max(1, self.block_elements // max(1, num_queries * self.width))
        best_scores = best_ids = None
        for start in range(0, self.num_items, chunk):
            end = min(start + chunk, self.num_items)
            scores = self.score_block(queries, start, end)  # (B, n)
            chunk_scores, chunk_cols = scores.topk(min(k, end - start), dim=1)
            chunk_ids = chunk_cols + start + 1
            if best_scores is not None:
                chunk_scores, chunk_ids = torch.cat([best_scores, chunk_scores], 1), torch.cat([best_ids, chunk_ids], 1)
            best_scores, pick = chunk_scores.topk(min(k, chunk_scores.shape[1]), dim=1)
            best_ids = chunk_ids.gather(1, pick)
        return best_scores, best_ids


class FaissIndexTopK(TopKRetriever):
    """Search in any FAISS inner-product index over the corpus (row r = item id r + 1): flat, HNSW, IVF, ..."""

    def __init__(self, index) -> None:
        self.index, self.num_items = index, int(index.ntotal)

    def fetch(self, queries, k, exclude=None):
        scores, rows = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        ids = torch.from_numpy(rows).long() + 1  # FAISS row -1 ("none") -> id 0
        scores = torch.from_numpy(scores).masked_fill(ids < 1, NEG_INF)
        return scores.to(queries.device), ids.to(queries.device)


class FaissInnerProductTopK(FaissIndexTopK):
    """Exact inner-product search with a FAISS flat index; ``to_gpu`` (a CPU index -> a GPU one) puts it on GPUs."""

    def __init__(self, item_vectors: Tensor, to_gpu: Callable[[Any], Any] | None = None) -> None:  # (N, D)
        import faiss

        index = faiss.IndexFlatIP(item_vectors.shape[1])
        if to_gpu is not None:
            index = to_gpu(index)
        index.add(item_vectors.detach().float().cpu().contiguous().numpy())
        super().__init__(index)
