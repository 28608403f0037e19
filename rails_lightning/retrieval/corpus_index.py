"""The encoded corpus and the retrievers over it, shared by everything that searches the corpus during a run.

Full-corpus evaluation (``CorpusEvaluation``, after every training epoch) and hard-negative mining
(``MinedNegatives``, at the start of the next one) both need the whole corpus encoded with the same
weights and a top-k retriever over it. One ``CorpusIndex``, owned by the model, encodes the corpus
once for as long as the weights stay the same and builds each retriever once per encoding; the
model calls ``invalidate`` whenever its weights change (an optimizer step, a loaded state dict), at a
training epoch's start once the objective took what it mines from, and when a trainer stage ends, so
that neither training steps nor an idle model hold an encoded corpus beside the objective's.

Distributed runs (DDP): each process encodes its 1/W share of the corpus and the shares are
all-gathered, so every process holds the whole encoded corpus without encoding all of it. Every
process asks at the same moments (they run the same hooks and invalidate together), as the
all-gather needs.

Shape legend: N corpus size (item ids 1..N, row r = item id r + 1), W processes, S = ceil(N / W)
rows per process's share.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import torch
from torch import Tensor

from rails_lightning.retrieval.backend import SearchOptions
from rails_lightning.retrieval.topk import SubsetTopK, TopKRetriever

#: Items encoded at once unless the caller asks otherwise (bounds the encoding's memory, not its result).
ENCODE_BATCH_SIZE = 65536


class Shards(NamedTuple):
    """How the processes of a run share the corpus encoding: this process encodes rows ``rank * S .. (rank + 1) * S``."""

    rank: int
    world_size: int
    all_gather: Callable[[Tensor], Tensor] | None  # (S, ...) in every process -> (W, S, ...); None for one process


class CorpusSource(Protocol):
    """What a corpus index encodes with and builds retrievers from (``RetrievalModule`` is one)."""

    @property
    def num_items(self) -> int: ...

    @property
    def training(self) -> bool: ...

    def train(self, mode: bool = True) -> Any: ...

    def encode_corpus(self, batch_size: int = ENCODE_BATCH_SIZE, start: int = 0, count: int | None = None) -> Any:
        """Item representations of corpus rows ``start .. start + count``; rows past the corpus as padding id 0."""

    def exact_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever: ...

    def approximate_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever | None: ...

    def corpus_shards(self) -> Shards:
        """This process's share of the encoding."""


class CorpusIndex:
    """The corpus encoded with the source's current weights, and the retrievers over it, built on first request.

    Args:
        source: the model whose item tower encodes the corpus and whose similarity searches it.
    """

    def __init__(self, source: CorpusSource) -> None:
        self.source = source
        self._items: Any = None
        self._retrievers: dict[tuple[str, SearchOptions], TopKRetriever | None] = {}

    def invalidate(self) -> None:
        """Drop the encoding and every retriever built on it: the next request encodes the corpus afresh."""
        self._items, self._retrievers = None, {}

    def encode(self, batch_size: int = ENCODE_BATCH_SIZE) -> Any:
        """The whole corpus (N, ...) encoded now, as evaluated (no dropout, no gradients), ``batch_size`` items at
        a time; under DDP this process's share, all-gathered (a collective: every process must call it)."""
        source = self.source
        rank, world_size, all_gather = source.corpus_shards()
        was_training = source.training
        source.train(False)
        with torch.no_grad():
            if world_size == 1:
                items = source.encode_corpus(batch_size)
            else:
                share = -(-source.num_items // world_size)  # S; the last share is padded to it
                part = source.encode_corpus(batch_size, start=rank * share, count=share)

                def gather(rows: Tensor) -> Tensor:  # (S, ...) in every process -> (N, ...)
                    return all_gather(rows).flatten(0, 1)[: source.num_items]

                items = gather(part) if isinstance(part, Tensor) else type(part)(*(gather(field) for field in part))
        source.train(was_training)
        return items

    def items(self, batch_size: int = ENCODE_BATCH_SIZE) -> Any:
        """The encoded corpus (N, ...): encoded on the first request after the weights changed, then reused."""
        if self._items is None:
            self._items = self.encode(batch_size)
        return self._items

    def exact_retriever(self, options: SearchOptions = SearchOptions()) -> TopKRetriever:
        """The similarity's exact top-k over ``items()``; one per encoding and exact-search options."""
        options = options.exact()
        key = ("exact", options)
        if key not in self._retrievers:
            self._retrievers[key] = self.source.exact_retriever(self.items(), options)
        return self._retrievers[key]

    def approximate_retriever(self, options: SearchOptions) -> TopKRetriever | None:
        """The similarity's approximate top-k over ``items()`` (None when it has none); one per encoding and options."""
        key = ("approximate", options)
        if key not in self._retrievers:
            self._retrievers[key] = self.source.approximate_retriever(self.items(), options)
        return self._retrievers[key]

    def subset_retriever(self, item_ids: Tensor, options: SearchOptions = SearchOptions()) -> TopKRetriever:
        """The similarity's exact top-k among the corpus items ``item_ids`` ((S,) ids, on the model's device) alone,
        over their rows of ``items()`` (no encoding of its own); built anew on every call."""
        rows = item_ids - 1
        items = self.items()
        subset = items[rows] if isinstance(items, Tensor) else type(items)(*(field[rows] for field in items))
        return SubsetTopK(self.source.exact_retriever(subset, options.exact()), item_ids, self.source.num_items)
