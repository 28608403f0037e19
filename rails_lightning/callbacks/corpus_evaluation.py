"""Full-corpus evaluation at every validation and test epoch.

At the start of the epoch the callback takes the whole item corpus, encoded with the current
weights, from the model's corpus index (``RetrievalModule.corpus_index``, which encodes it only when
the weights changed since its last encoding and shares it with objectives that mine negatives) and
the model's own top-k routine over it (the similarity's exact retriever: a FAISS or torch
inner-product search for the dot product, exact MoL scoring for MoL): the callback never assumes the
score is an inner product. Each validation batch's query
representations are searched, the user's history excluded, and the top-K ids feed a
``RetrievalMetrics`` whose sum states synchronise under DDP (with each target's graded relevance when the
batch carries it: BEIR's nDCG). Metrics are logged as ``val/hr@10``, ``test/ndcg@10``, ``val/mrr``, and
``val/mrr@10`` with ``mrr_cutoff=10``.

Groups of targets (the DataModule's ``target_groups``, e.g. the events a user liked or disliked) get the same
metrics apart, from the same rankings, as ``val/<group>/hr@10``, ...: each query's targets restricted to the
group, queries with no target in it left out.

Cold-start items (the DataModule's ``cold_item_fraction``, never seen in training): their targets are the
group ``cold`` (``val/cold/hr@10``: ranked against the whole corpus), the others ``warm``; and the cold targets
ranked among the cold items alone, by the similarity's exact top-k over the cold items' rows of the encoded
corpus, give ``val/cold_only/hr@10``, ... (each query with a cold target, its warm targets dropped).

Distributed runs (DDP): the corpus index has each process encode its 1/W share of the corpus and
all-gathers the shares, so every process holds the whole encoded corpus and searches it for its own queries
(the DataModule gives each process its own slice of them); the metric states are summed across
processes, so the figures equal a one-process evaluation's.

An approximate index is searched beside the exact one when the model offers it: a FAISS index of
any factory type for a similarity whose scores are inner products (the dot product:
``index="IVF4096,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``, with ``index_search="nprobe=64"``), rebuilt
from each new encoding of the corpus, or the similarity's own
(the RAILS algorithms for MoL). Its results get the same metrics under ``val/index/...``;
``val/index_recall@100`` is the mean overlap ``|index top-100 & exact top-100| / |exact top-100|``.
With ``index_every_n_epochs`` > 1 it is searched at every n-th validation of a fit and at its last
epoch only (and at every test): on small corpora the RAILS top-k costs more than the exact one it
is compared with.

Timings: ``val/encode_seconds`` (re-encoding the corpus, gathering included; 0 when the corpus index
already held the encoding of these weights), ``val/search_seconds``
(building the exact index and searching every query), ``val/index_build_seconds`` and
``val/index_search_seconds`` (the approximate index).

``history`` keeps every validation epoch's metrics, each with the run's ``fit_seconds`` when it ended (quality
against wall time), and ``fit_seconds`` the time spent in ``fit``; both travel in checkpoints, so a resumed run's
record holds the whole run (the run record stores them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.aggregation import MeanMetric

from rails_lightning.errors import ConfigError
from rails_lightning.metrics import RetrievalMetrics, update_in_group
from rails_lightning.models.retrieval_module import RetrievalModule
from rails_lightning.retrieval import SearchOptions
from rails_lightning.retrieval.backend import Backend

RECALL_VS_EXACT_K = 100


class CorpusEvaluation(Callback):
    """Retrieve every query's top K over the corpus (as the model's corpus index encodes it), log HR/Recall/NDCG@K and MRR.

    Args:
        ks: cut-offs K of HR@K, Recall@K and NDCG@K; MRR is truncated at max(ks).
        mrr_cutoff: also log MRR truncated at this rank (``val/mrr@10`` for 10, as BEIR and MS MARCO report it);
            None for none. At most max(ks).
        exclude_history: do not rank items already in the user's history.
        encode_batch_size: items encoded at once when re-encoding the corpus.
        backend: top-k backend (``auto``: FAISS on the CPU, or on a GPU FAISS sees; the exact torch
            top-k on the model's device otherwise).
        score_block_elements: exact torch scoring holds at most this many (query, item[, component])
            values at once (bounds its memory, ~20 bytes each).
        index: FAISS factory string of an approximate index searched beside the exact one, for a similarity
            whose scores are inner products (the dot product: ``IVF4096,Flat``, ``HNSW32``, ``IVF4096,PQ32``,
            ...); None for none.
        index_search: the index's search parameters (FAISS ``ParameterSpace``), e.g. ``nprobe=64``, ``efSearch=128``.
        index_train_size: corpus vectors (a random sample) that train the index each epoch.
        index_every_n_epochs: search the approximate index (``index``, or the model's own approximate top-k)
            at the validations of epochs n - 1, 2n - 1, ... and of the fit's last epoch only; tests and a
            separate ``validate`` always search it. Checkpoints and early stopping cannot then monitor an
            ``/index`` metric (it is missing in the other epochs).
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 10, 50, 200),
        mrr_cutoff: int | None = None,
        exclude_history: bool = True,
        encode_batch_size: int = 65536,
        backend: Backend = "auto",
        score_block_elements: int = 1 << 22,
        index: str | None = None,
        index_search: str = "",
        index_train_size: int = 1 << 18,
        index_every_n_epochs: int = 1,
    ) -> None:
        if index_every_n_epochs < 1:
            raise ConfigError(f"CorpusEvaluation(index_every_n_epochs) must be >= 1, got {index_every_n_epochs}")
        self.ks = tuple(ks)
        if mrr_cutoff is not None and not 0 < mrr_cutoff <= max(self.ks):
            raise ConfigError(f"CorpusEvaluation(mrr_cutoff={mrr_cutoff}) must be in 1..max(ks) = {max(self.ks)}")
        self.mrr_cutoffs = () if mrr_cutoff is None else (mrr_cutoff,)
        self.index_every_n_epochs = index_every_n_epochs
        self.exclude_history = exclude_history
        self.encode_batch_size = encode_batch_size
        self.options = SearchOptions(backend, score_block_elements, index, index_search, index_train_size)
        self.metrics = RetrievalMetrics(self.ks, self.mrr_cutoffs)
        self.retriever = None
        self.search_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self._fit_seconds_before = 0.0  # fit time of the run before a resume
        self._fit_started: float | None = None
        self._warned_small_corpus = False
        # Only used when the model offers an approximate top-k.
        self.index_metrics = RetrievalMetrics(self.ks, self.mrr_cutoffs)
        self.index_recall = MeanMetric()
        self.index_retriever = None
        self.index_search_seconds = 0.0
        self.last_metrics: dict[str, float] = {}  # the metrics of the latest validation or test
        self.group_metrics: dict[str, RetrievalMetrics] = {}  # the DataModule's target groups', by name
        # Under a cold split: the exact top-k among the cold items alone, which items are cold, and their metrics.
        self.cold_retriever = None
        self.cold_items: torch.Tensor | None = None  # (N + 1,) bool
        self.cold_only_metrics = RetrievalMetrics(self.ks)

    # -- the run's history and fit time, kept across resumes
    def on_fit_start(self, trainer, pl_module):
        self._fit_started = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self._fit_seconds_before, self._fit_started = self.fit_seconds, None

    @property
    def fit_seconds(self) -> float:
        """Seconds spent in ``fit`` so far, over every resume of the run."""
        running = 0.0 if self._fit_started is None else time.perf_counter() - self._fit_started
        return self._fit_seconds_before + running

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "fit_seconds": self.fit_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._fit_seconds_before = float(state_dict.get("fit_seconds", 0.0))

    def metric_keys(self, pl_module: RetrievalModule, stages: Sequence[str] = ("val", "test"), datamodule: Any = None) -> set[str]:
        """Every metric key this callback logs for ``pl_module`` (what a sweep or a checkpoint may monitor), with
        ``datamodule`` its target groups' and cold items' too (logged when some query has such a target)."""
        names = [f"{m}@{k}" for k in self.ks for m in ("hr", "recall", "ndcg")] + ["mrr"] + [f"mrr@{c}" for c in self.mrr_cutoffs]
        keys = {f"{stage}/{name}" for stage in stages for name in [*names, "encode_seconds", "search_seconds"]}
        groups = list(getattr(datamodule, "target_group_names", ()))
        if getattr(datamodule, "cold_item_ids", None) is not None:
            groups.append("cold_only")
        keys |= {f"{stage}/{group}/{name}" for stage in stages for group in groups for name in names}
        if pl_module.similarity.offers_approximate_retriever(self.options):
            extra = [f"index/{n}" for n in names] + [f"index_recall@{RECALL_VS_EXACT_K}", "index_build_seconds", "index_search_seconds"]
            keys |= {f"{stage}/{name}" for stage in stages for name in extra}
        return keys

    def setup(self, trainer, pl_module, stage):
        # Before any training: an inner-product index with a similarity whose scores are not inner products.
        if self.options.index is not None and isinstance(pl_module, RetrievalModule) and not pl_module.similarity.scores_are_inner_products:
            raise ConfigError(
                f"CorpusEvaluation(index={self.options.index!r}) is an inner-product index, for the dot product; "
                f"{pl_module.model_name} chooses its approximate top-k in --model.similarity.init_args.approximate_topk"
            )
        if self.index_every_n_epochs > 1:  # a monitored metric that most epochs lack would stop the fit later
            monitors = [getattr(callback, "monitor", None) for callback in trainer.callbacks]
            skipped = [monitor for monitor in monitors if isinstance(monitor, str) and "/index" in monitor]
            if skipped:
                raise ConfigError(
                    f"{skipped[0]!r} is monitored, but CorpusEvaluation(index_every_n_epochs={self.index_every_n_epochs}) "
                    "logs the approximate index's metrics in some epochs only; monitor an exact metric or set it to 1"
                )

    # -- epoch start: corpus -> retriever
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, approximate: bool = True) -> None:
        if not isinstance(pl_module, RetrievalModule):
            raise TypeError(f"CorpusEvaluation evaluates a RetrievalModule, not {type(pl_module).__name__}")
        if max(self.ks) > pl_module.num_items and not self._warned_small_corpus:
            self._warned_small_corpus = True
            rank_zero_warn(
                f"ks {list(self.ks)} go beyond the corpus ({pl_module.num_items} items): at K >= {pl_module.num_items} "
                "every allowed item is retrieved, so HR@K there is the share of targets not excluded"
            )
        corpus = pl_module.corpus_index
        started = time.perf_counter()
        corpus.items(self.encode_batch_size)
        self.encode_seconds = time.perf_counter() - started
        with torch.no_grad():
            started = time.perf_counter()
            self.retriever = corpus.exact_retriever(self.options)
            self.search_seconds = time.perf_counter() - started  # the exact index's build counts as search
            started = time.perf_counter()
            self.index_retriever = corpus.approximate_retriever(self.options) if approximate else None
            self.index_build_seconds = time.perf_counter() - started
        self.index_search_seconds = 0.0
        self.metrics, self.index_metrics = self.metrics.to(pl_module.device), self.index_metrics.to(pl_module.device)
        self.index_recall = self.index_recall.to(pl_module.device)
        groups = getattr(trainer.datamodule, "target_group_names", ()) if trainer.datamodule is not None else ()
        reserved = [name for name in groups if name in ("index", "cold_only") or "/" in name]
        if reserved:
            raise ConfigError(f"target group {reserved[0]!r} cannot name a metric group (it is reserved or has a '/')")
        self.group_metrics = {name: RetrievalMetrics(self.ks).to(pl_module.device) for name in groups}
        cold_ids = getattr(trainer.datamodule, "cold_item_ids", None) if trainer.datamodule is not None else None
        self.cold_retriever = self.cold_items = None
        if cold_ids is not None:
            cold_ids = torch.as_tensor(cold_ids, device=pl_module.device)
            with torch.no_grad():
                self.cold_retriever = corpus.subset_retriever(cold_ids, self.options)
            self.cold_items = torch.zeros(pl_module.num_items + 1, dtype=torch.bool, device=pl_module.device)
            self.cold_items[cold_ids] = True
        self.cold_only_metrics = self.cold_only_metrics.to(pl_module.device)
        for metric in (self.metrics, self.index_metrics, self.index_recall, self.cold_only_metrics):
            metric.reset()

    def _index_due(self, trainer: pl.Trainer) -> bool:
        """Whether this validation searches the approximate index (``index_every_n_epochs``)."""
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        epoch, last = trainer.current_epoch, (trainer.max_epochs or 0) - 1
        return (epoch + 1) % self.index_every_n_epochs == 0 or epoch == last

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module, approximate=self._index_due(trainer))

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    # -- every batch: search and accumulate
    def _batch(self, batch: Any, queries: Any) -> None:
        started = time.perf_counter()
        exclude = batch.exclusion if self.exclude_history else None
        k = max(self.ks) if self.index_retriever is None else max(*self.ks, RECALL_VS_EXACT_K)
        _, ids = self.retriever.search(queries, k, exclude)
        self.search_seconds += time.perf_counter() - started
        self.metrics.update(ids.to(batch.targets.device), batch.targets, batch.target_gains)
        for g, metric in enumerate(self.group_metrics.values()):
            update_in_group(metric, ids, batch.targets, ((batch.target_groups >> g) & 1).bool())
        if self.cold_retriever is not None:
            is_cold = self.cold_items[batch.targets]  # (B, T), padding is not cold
            if is_cold.any():  # every query is searched among the cold items; those with a cold target count
                _, cold_ids = self.cold_retriever.search(queries, max(self.ks), exclude)
                update_in_group(self.cold_only_metrics, cold_ids, batch.targets, is_cold)
        if self.index_retriever is not None:
            started = time.perf_counter()
            _, index_ids = self.index_retriever.search(queries, k, exclude)
            self.index_search_seconds += time.perf_counter() - started
            self.index_metrics.update(index_ids.to(batch.targets.device), batch.targets, batch.target_gains)
            exact, approx = ids[:, :RECALL_VS_EXACT_K], index_ids[:, :RECALL_VS_EXACT_K].to(ids.device)
            found = (exact[:, :, None] == approx[:, None, :]).any(-1) & (exact > 0)  # (B, 100)
            self.index_recall.update(found.sum(1) / (exact > 0).sum(1).clamp_min(1))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(batch, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(batch, outputs)

    # -- epoch end: log
    def _end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {f"{stage}/{name}": value for name, value in self.metrics.compute().items()}
        for group, metric in self.group_metrics.items():
            group_values = metric.compute()  # summed over processes: NaN in every process when no query had such a target
            if not torch.isnan(group_values["mrr"]):
                values.update({f"{stage}/{group}/{name}": value for name, value in group_values.items()})
        if self.cold_retriever is not None:
            cold_values = self.cold_only_metrics.compute()  # NaN when no query had a cold target
            if not torch.isnan(cold_values["mrr"]):
                values.update({f"{stage}/cold_only/{name}": value for name, value in cold_values.items()})
        values[f"{stage}/encode_seconds"] = torch.tensor(self.encode_seconds)
        values[f"{stage}/search_seconds"] = torch.tensor(self.search_seconds)
        if self.index_retriever is not None:
            values.update({f"{stage}/index/{name}": value for name, value in self.index_metrics.compute().items()})
            values[f"{stage}/index_recall@{RECALL_VS_EXACT_K}"] = self.index_recall.compute()
            values[f"{stage}/index_build_seconds"] = torch.tensor(self.index_build_seconds)
            values[f"{stage}/index_search_seconds"] = torch.tensor(self.index_search_seconds)
        # The metrics are already reduced across processes by their sum states, so the mean over processes
        # (sync_dist) leaves them as they are; for the timings it is the mean process's. Headline numbers go to
        # the progress bar.
        # This evaluation's own metrics: trainer.callback_metrics also holds earlier epochs' index metrics.
        self.last_metrics = {k: float(v) for k, v in values.items()}
        headline = {k: values.pop(k) for k in (f"{stage}/hr@10", f"{stage}/ndcg@10") if k in values}
        pl_module.log_dict(headline, prog_bar=True, sync_dist=True)
        pl_module.log_dict(values, sync_dist=True)
        if stage == "val" and trainer.state.fn == TrainerFn.FITTING:  # the epochs of training, not a later validate
            # fit_seconds: the run's fit time when this evaluation ended, so that quality can be read against wall time.
            self.history.append({"epoch": trainer.current_epoch, "fit_seconds": round(self.fit_seconds, 3),
                                 **{k: float(v) for k, v in {**headline, **values}.items()}})
        self.retriever = self.index_retriever = None  # the corpus index holds them while the weights stay the same
        self.cold_retriever = None

    # -- predict: write every query's top-K recommendations next to the run
    def on_predict_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module, approximate=False)
        self.predictions = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        exclude = batch.exclusion if self.exclude_history else None
        scores, ids = self.retriever.search(outputs, max(self.ks), exclude)
        self.predictions.append((batch.user_ids.cpu(), ids.cpu(), scores.cpu()))

    def on_predict_epoch_end(self, trainer, pl_module):
        datamodule = trainer.datamodule
        # Under DDP each process writes the users it answered.
        name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        path = Path(trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            for users, ids, scores in self.predictions:
                for user, row, row_scores in zip(users.tolist(), ids.tolist(), scores.tolist()):
                    kept = [(i, s) for i, s in zip(row, row_scores) if i > 0]
                    record = {
                        "user": datamodule.store.user_raw_ids[user].item(),  # an int or a text id
                        **({"query": datamodule.query_texts[user]} if datamodule.query_texts is not None else {}),
                        "items": [datamodule.store.item_raw_ids[i].item() for i, _ in kept],
                        "titles": [datamodule.item_titles[i] for i, _ in kept[:10]],
                        "scores": [round(s, 5) for _, s in kept],
                    }
                    out.write(json.dumps(record) + "\n")
        print(f"[rails_lightning] top-{max(self.ks)} recommendations of {sum(len(u) for u, _, _ in self.predictions)} users: {path}")
        self.predictions, self.retriever = [], None

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end("test", trainer, pl_module)
