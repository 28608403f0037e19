"""Top-k over the full corpus: one interface (``TopKRetriever``), one backend choice (``backend``),
one exclusion / over-fetch path (``TopKRetriever.search``), the retrievers built on them, and the
encoded corpus a run's evaluation and mining share (``CorpusIndex``)."""

from rails_lightning.retrieval.backend import (
    SearchOptions,
    approximate_inner_product_retriever,
    build_faiss_index,
    inner_product_retriever,
    uses_faiss,
)
from rails_lightning.retrieval.corpus_index import CorpusIndex, CorpusSource, Shards
from rails_lightning.retrieval.topk import BruteForceTopK, Exclusion, FaissInnerProductTopK, SubsetTopK, TopKRetriever

__all__ = [
    "SearchOptions", "inner_product_retriever", "approximate_inner_product_retriever", "build_faiss_index", "uses_faiss",
    "TopKRetriever", "BruteForceTopK", "SubsetTopK", "FaissInnerProductTopK", "Exclusion", "CorpusIndex", "CorpusSource", "Shards",
]
