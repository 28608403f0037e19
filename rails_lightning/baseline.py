"""Baselines every model is reported beside, evaluated under the protocol ``CorpusEvaluation`` applies to a
model: the full corpus, the user's history excluded, the same ``RetrievalMetrics`` over the same val or test
queries, with the same target groups (``val/<group>/hr@10``) and, under a cold split, the cold targets ranked
among the cold items alone (``val/cold_only/hr@10``).

* **popularity** -- the most frequent items the query has not seen. ``fit`` records it in the run record
  (``RunRecord.baseline``) beside the best checkpoint's metrics. Fair to the model it is compared with: the
  counts are over what the model sees at that stage (``InteractionDataModule.visible_item_counts``: at test
  time the validation item too; under a cold split warm items only, so every cold item counts 0), and ties
  are broken *against* the baseline: a target tied in count with other items ranks after all of them (a
  baseline that put its target first among equals would look better than any ranking could justify).

Beside it, under a cold split, in ``RunRecord.baselines`` by name:

* **random** -- a seeded random ranking;
* **category_popularity** -- an item scores the mean of the popularity (visible counts, as above) of its
  categorical values (e.g. genres) over the items that have each value: a cold item inherits its genres'
  popularity;
* **content_knn** -- an item scores the cosine between its text vector (the content tower's own featuriser)
  and the mean text vector of the query's history as the model reads it (its last ``max_seq_len`` items).

These score whole categories or texts alike, so their ties are broken in a seeded random order (not against
the target: for category popularity that would rank a target last among every item of its genres).

Text retrieval (``text_retrieval_baselines``, for data whose queries are texts, ``BeirSource``; in
``RunRecord.baselines`` too): each query's text against each document's text (the item-content column
``document``, what ``BeirSource`` makes of the corpus fields), nothing excluded, as BEIR evaluates them:

* ``bm25``: BM25 of the ``bm25s`` package (its defaults: k1 1.5, b 0.75, Lucene's idf), English stop words and
  the Snowball English stemmer of ``PyStemmer``;
* ``zero_shot_minilm``: the cosine of all-MiniLM-L6-v2's sentence vectors of query and document (the document
  vectors cached on disk as a content tower caches them, so a run whose tower reads them pays nothing more).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rails_lightning.data.batches import QueryBatch
from rails_lightning.data.beir import DOCUMENT_COLUMN
from rails_lightning.data.text_features import DEFAULT_CACHE_DIR, PretrainedSentenceEncoder, embed_texts
from rails_lightning.errors import ConfigError
from rails_lightning.metrics import RetrievalMetrics, update_in_group
from rails_lightning.retrieval.topk import NEG_INF, BruteForceTopK, Exclusion, TopKRetriever, keep_allowed

ItemScores = Callable[[QueryBatch], Tensor]  # a batch of B queries -> (B, N) scores of items 1..N


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

    def scores(self, targets: Tensor) -> Tensor:
        """(B, T) target ids -> (B, N) the count of every item, a target's half a count lower."""
        return self._score_block(targets, 0, self.num_items)

    def fetch(self, queries, k, exclude=None):
        return self.exact.fetch(queries, k)


class RankedScores(TopKRetriever):
    """Ranks the items by given scores: the queries are a (B, N) matrix of item scores (column i - 1: item i),
    best first, ties in a seeded random order (no item wins a tie by its id)."""

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.generator = torch.Generator().manual_seed(seed)

    def fetch(self, scores: Tensor, k: int, exclude: Exclusion | None = None) -> tuple[Tensor, Tensor]:
        if exclude is not None:  # the excluded items score -inf, so that no over-fetch is needed
            rows, items = exclude.pairs()
            scores = scores.index_put((rows, items - 1), torch.tensor(NEG_INF, dtype=scores.dtype))
        # The columns in a random order: whichever of equal scores top-k picks first is then a random one.
        order = torch.randperm(self.num_items, generator=self.generator)  # (N,)
        top, where = scores.index_select(1, order).topk(k, dim=1)  # (B, k)
        return top, order[where] + 1

    def search(self, scores: Tensor, k: int, exclude: Exclusion | None = None) -> tuple[Tensor, Tensor]:
        """As every retriever's ``search``, with the exclusion applied to the scores: k items are fetched, and the
        excluded (-inf) ones among them dropped."""
        top, ids = self.fetch(scores, min(k, self.num_items), exclude)
        return keep_allowed(top, ids, k, None, self.num_items)


def evaluate_scores(datamodule, stage: str, score: ItemScores, ks: Iterable[int] = (1, 10, 50, 200),
                    exclude_history: bool = True, seed: int = 0, mrr_cutoffs: Sequence[int] = ()) -> dict[str, float]:
    """The metrics of ranking the items by ``score`` on the DataModule's ``stage`` ("val" or "test") queries, under
    the keys ``CorpusEvaluation`` logs for a model: ``val/hr@10``, each target group's ``val/<group>/hr@10`` and,
    under a cold split, ``val/cold_only/hr@10`` (the cold targets among the cold items; warm items score -inf)."""
    ks = tuple(ks)
    datamodule.setup("validate" if stage == "val" else "test")
    ranking = RankedScores(datamodule.num_items, seed)
    groups = datamodule.target_group_names
    overall = RetrievalMetrics(ks, mrr_cutoffs, sync_on_compute=False)  # every query, in this process
    by_group = {name: RetrievalMetrics(ks, sync_on_compute=False) for name in groups}
    cold = None if datamodule.cold_items is None else torch.from_numpy(datamodule.cold_items)  # (N + 1,)
    cold_only = RetrievalMetrics(ks, sync_on_compute=False)
    for batch in datamodule.query_loader(stage, sharded=False):
        scores = score(batch)  # (B, N)
        exclude = batch.exclusion if exclude_history else None
        _, ids = ranking.search(scores, max(ks), exclude)
        overall.update(ids, batch.targets, batch.target_gains)
        for g, metric in enumerate(by_group.values()):
            update_in_group(metric, ids, batch.targets, ((batch.target_groups >> g) & 1).bool())
        if cold is not None:
            _, cold_ids = ranking.search(scores.masked_fill(~cold[1:], NEG_INF), max(ks), exclude)
            update_in_group(cold_only, cold_ids, batch.targets, cold[batch.targets])
    values = {f"{stage}/{name}": float(value) for name, value in overall.compute().items()}
    parts = {**by_group, **({"cold_only": cold_only} if cold is not None else {})}
    for part, metric in parts.items():
        if int(metric.count):  # a group no query had a target in is left out, as CorpusEvaluation does
            values.update({f"{stage}/{part}/{name}": float(value) for name, value in metric.compute().items()})
    return values


def popularity_baseline(
    datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), exclude_history: bool = True, mrr_cutoffs: Sequence[int] = (),
) -> dict[str, float]:
    """Full-corpus metrics of the popularity baseline on the DataModule's val or test queries."""
    datamodule.setup("validate" if stage == "val" else "test")
    popularity = PopularityTopK(datamodule.visible_item_counts(stage))
    return evaluate_scores(datamodule, stage, lambda batch: popularity.scores(batch.targets), ks, exclude_history, mrr_cutoffs=mrr_cutoffs)


def random_baseline(datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), seed: int = 0) -> dict[str, float]:
    """A seeded random ranking (every item scores the same; the random tie order decides)."""
    return evaluate_scores(datamodule, stage, lambda batch: torch.zeros(len(batch.targets), datamodule.num_items), ks, seed=seed)


def category_popularity(item_counts: np.ndarray, categories: list[tuple[str, ...]]) -> np.ndarray:
    """(N + 1,) item counts and each item's categorical values (row 0: padding) -> (N + 1,) each item's mean over
    its values of the value's popularity (the summed counts of the items with that value); 0 for an item without
    values."""
    value_counts: dict[str, float] = defaultdict(float)
    for count, values in zip(item_counts.tolist(), categories):
        for value in set(values):
            value_counts[value] += count
    return np.array([np.mean([value_counts[v] for v in set(values)]) if values else 0.0 for values in categories])


def category_popularity_baseline(datamodule, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200), columns: Iterable[str] | None = None,
                                 seed: int = 0) -> dict[str, float]:
    """Items ranked by the popularity of their categorical values (``columns`` of the DataModule's item content,
    all of them by default; a value is named by its column, so two columns' equal values stay apart)."""
    content = datamodule.item_content
    offered = [] if content is None else list(content.categorical)
    columns = offered if columns is None else list(columns)
    if not columns or any(c not in offered for c in columns):
        raise ConfigError(f"category popularity needs categorical item content: asked for {columns or 'any column'}, the data has {offered}")
    categories = [tuple(f"{c}={v}" for c in columns for v in content.categorical[c][row]) for row in range(len(content))]
    datamodule.setup("validate" if stage == "val" else "test")
    scores = torch.from_numpy(category_popularity(datamodule.visible_item_counts(stage), categories)[1:])  # (N,)
    return evaluate_scores(datamodule, stage, lambda batch: scores.expand(len(batch.targets), -1), ks, seed=seed)


def content_knn_baseline(datamodule, item_vectors: Tensor, stage: str = "val", ks: Iterable[int] = (1, 10, 50, 200),
                         seed: int = 0) -> dict[str, float]:
    """Items ranked by the cosine between their content vector (``item_vectors`` (N + 1, T), row 0 padding) and the
    mean content vector of the history the model reads (a query without history scores every item 0)."""
    vectors = F.normalize(item_vectors.float(), dim=-1)  # (N + 1, T)

    def score(batch: QueryBatch) -> Tensor:
        history = vectors[batch.input_ids] * (batch.input_ids > 0).unsqueeze(-1)  # (B, L, T)
        query = F.normalize(history.sum(1), dim=-1)  # (B, T): the mean's direction
        return query @ vectors[1:].T  # (B, N)

    return evaluate_scores(datamodule, stage, score, ks, seed=seed)


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
