"""The baselines every model is reported beside, computed on the DataModule's own split with the same
``RetrievalMetrics``: the most popular items for every dataset, and, for data whose queries are texts
(``BeirSource``), BM25 and the zero-shot pretrained sentence encoder.

The most-popular-items baseline: each query gets the most frequent
items it has not seen, evaluated under the protocol ``CorpusEvaluation`` applies to a model (the full
corpus, the user's history excluded, the same ``RetrievalMetrics`` over the same val or test queries).
``fit`` records it in the run record (``RunRecord.baseline``) beside the best checkpoint's metrics.

Fair to the model it is compared with: the counts are over what the model sees at that stage
(``InteractionDataModule.visible_item_counts``: at test time the validation item too), the same
history is excluded, and ties are broken *against* the baseline: a target tied in count with other
items ranks after all of them (a baseline that put its target first among equals would look better
than any ranking could justify).

Text retrieval (``text_retrieval_baselines``): each query's text against each document's text (the item-content
column ``document``, what ``BeirSource`` makes of the corpus fields), nothing excluded, as BEIR evaluates them:

* ``bm25``: BM25 of the ``bm25s`` package (its defaults: k1 1.5, b 0.75, Lucene's idf), English stop words and
  the Snowball English stemmer of ``PyStemmer``;
* ``zero_shot_minilm``: the cosine of all-MiniLM-L6-v2's sentence vectors of query and document (the document
  vectors cached on disk as a content tower caches them, so a run whose tower reads them pays nothing more).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from rails_lightning.data.beir import DOCUMENT_COLUMN
from rails_lightning.data.text_features import DEFAULT_CACHE_DIR, PretrainedSentenceEncoder, embed_texts
from rails_lightning.errors import ConfigError
from rails_lightning.metrics import RetrievalMetrics
from rails_lightning.retrieval.topk import BruteForceTopK, TopKRetriever


class PopularityTopK(TopKRetriever):
    """Ranks items by count, excluding each query's history. The queries are each query's target ids
    (B, T), 0-padded (or any (B,) tensor for no targets): a target scores half a count below its
    equals, so that ties rank it last."""

    def __init__(self, item_counts: np.ndarray | Tensor) -> None:  # (N + 1,), [0] is padding
        self.counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)[1:]
        self.num_items = len(self.counts)
        self.exact = BruteForceTopK(self._score_block, self.num_items, 1 << 24)

    def _score_block(self, targets: Tensor, start: int, end: int) -> Tensor:
        scores = self.counts[start:end].expand(len(targets), -1).clone()  # (B, n)
        if targets.ndim == 2:
            ids = torch.arange(start + 1, end + 1)
            is_target = (targets[:, :, None] == ids[None, None, :]).any(1)  # (B, n)
            scores -= 0.5 * is_target
        return scores

    def fetch(self, queries, k, exclude=None):
        return self.exact.fetch(queries, k)


def popularity_baseline(
    datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), exclude_history: bool = True, mrr_cutoffs: Sequence[int] = (),
) -> dict[str, float]:
    """Full-corpus metrics of the popularity baseline on the DataModule's val or test queries."""
    datamodule.setup("validate" if stage == "val" else "test")
    retriever = PopularityTopK(datamodule.visible_item_counts(stage))
    metric = RetrievalMetrics(ks, mrr_cutoffs, sync_on_compute=False)  # every query, in this process
    for batch in datamodule.query_loader(stage, sharded=False):
        _, ids = retriever.search(batch.targets, max(ks), batch.exclusion if exclude_history else None)
        metric.update(ids, batch.targets, batch.target_gains)
    return {f"{stage}/{name}": float(value) for name, value in metric.compute().items()}


def _ranked_metrics(datamodule, stage: str, ks: Sequence[int], mrr_cutoffs: Sequence[int], rank) -> dict[str, float]:
    """Metrics of ``rank(user_ids (B,), k) -> (B, k) item ids`` on the val or test queries, nothing excluded."""
    datamodule.setup("validate" if stage == "val" else "test")
    metric = RetrievalMetrics(ks, mrr_cutoffs, sync_on_compute=False)
    for batch in datamodule.query_loader(stage, sharded=False):
        metric.update(rank(batch.user_ids, max(ks)), batch.targets, batch.target_gains)
    return {f"{stage}/{name}": float(value) for name, value in metric.compute().items()}


def _documents_and_queries(datamodule, text_column: str) -> tuple[list[str], list[str]]:
    """The text of items 0..N (0: padding, empty: the rows a content tower reads, so that both share the cached
    vectors) and of every query (user index)."""
    content = datamodule.item_content
    if datamodule.query_texts is None or content is None or text_column not in content.text:
        raise ConfigError(
            f"text-retrieval baselines need query texts and the item-content text column {text_column!r} "
            f"({datamodule.source.description} has {'no query texts' if datamodule.query_texts is None else 'no such column'})"
        )
    return content.text[text_column], datamodule.query_texts


def _padded(ids: Tensor, k: int) -> Tensor:
    """(B, k') item ids -> (B, k), 0 (nothing) past a corpus smaller than k."""
    return torch.nn.functional.pad(ids, (0, k - ids.shape[1])) if ids.shape[1] < k else ids


def bm25_baseline(
    datamodule, stages: Sequence[str] = ("val", "test"), ks: Iterable[int] = (1, 10, 100), mrr_cutoffs: Sequence[int] = (10,),
    text_column: str = DOCUMENT_COLUMN,
) -> dict[str, float]:
    """BM25 (``bm25s``; English stop words, Snowball stemmer) of each query's text over the documents."""
    try:
        import bm25s
        import Stemmer
    except ImportError as error:
        raise ConfigError('the BM25 baseline needs the packages bm25s and PyStemmer: pip install -e ".[text]"') from error
    documents, queries = _documents_and_queries(datamodule, text_column)
    documents = documents[1:]  # items 1..N
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)

    def rank(user_ids: Tensor, k: int) -> Tensor:
        tokens = bm25s.tokenize([queries[u] for u in user_ids.tolist()], stopwords="en", stemmer=stemmer, show_progress=False)
        rows, _ = retriever.retrieve(tokens, k=min(k, len(documents)), show_progress=False, n_threads=1)  # (B, k) rows 0..N-1
        return _padded(torch.from_numpy(np.asarray(rows, dtype=np.int64)) + 1, k)

    ks = tuple(ks)
    return {key: value for stage in stages for key, value in _ranked_metrics(datamodule, stage, ks, mrr_cutoffs, rank).items()}


def zero_shot_baseline(
    datamodule, stages: Sequence[str] = ("val", "test"), ks: Iterable[int] = (1, 10, 100), mrr_cutoffs: Sequence[int] = (10,),
    text_column: str = DOCUMENT_COLUMN, text_cache_dir: str | None = DEFAULT_CACHE_DIR,
) -> dict[str, float]:
    """all-MiniLM-L6-v2, zero-shot: the cosine of the query's and the document's normalised sentence vectors."""
    documents, queries = _documents_and_queries(datamodule, text_column)
    encoder = PretrainedSentenceEncoder()
    document_vectors = torch.from_numpy(embed_texts(encoder, documents, text_cache_dir))[1:]  # (N, 384), items 1..N
    query_vectors = torch.from_numpy(embed_texts(encoder, queries, text_cache_dir))  # (U, 384)

    def rank(user_ids: Tensor, k: int) -> Tensor:
        scores = query_vectors[user_ids] @ document_vectors.T  # (B, N)
        return _padded(scores.topk(min(k, len(document_vectors)), dim=1).indices + 1, k)

    ks = tuple(ks)
    return {key: value for stage in stages for key, value in _ranked_metrics(datamodule, stage, ks, mrr_cutoffs, rank).items()}


TEXT_BASELINES = {"bm25": bm25_baseline, "zero_shot_minilm": zero_shot_baseline}


def text_retrieval_baselines(datamodule, ks: Iterable[int] = (1, 10, 100), mrr_cutoffs: Sequence[int] = (10,)) -> dict[str, dict[str, float]]:
    """``{"bm25": {"val/ndcg@10": ...}, "zero_shot_minilm": {...}}`` on the DataModule's val and test queries; {}
    for data whose queries are not texts."""
    if datamodule.query_texts is None:
        return {}
    return {name: baseline(datamodule, ks=ks, mrr_cutoffs=mrr_cutoffs) for name, baseline in TEXT_BASELINES.items()}
