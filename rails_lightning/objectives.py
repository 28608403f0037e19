"""Training objectives: which items each training query's positive is contrasted with.

Every objective is a softmax cross-entropy of the positive against a set of negatives; they differ in
how the negatives are drawn. An objective returns up to three kinds of negatives:

* **shared** negatives (R_S ids), scored against every query of the step with one ``similarity.score``
  call as one group of M queries (one (M, R_S) matmul for the dot product);
* **per-query** negatives ((M, R_Q) ids), scored with ``similarity.score`` as M groups of one query;
* **per-sequence** negatives ((B, R_B) ids), negatives of every training position of a sequence, scored with
  ``similarity.score`` as B groups of L positions: each item is encoded and laid out once per
  sequence, not once per position, which keeps them cheap;

and, for each, the log of how many times it was expected to be drawn (the logQ correction: subtracted
from its logit so that a sampled softmax estimates the full one; zeros where it does not apply).
``RetrievalModule`` scores both, concatenates them, masks negatives equal to the positive ("accidental
hits") and takes the cross-entropy. Chosen with ``class_path`` under ``model.objective``:

* ``SharedNegatives`` -- uniform negatives (and optionally in-batch ones) shared by the batch;
* ``PerQueryNegatives`` -- uniform negatives drawn for every query (position) separately;
* ``FullSoftmax`` -- every corpus item is a negative: the exact softmax, cheap for catalogues of a few
  thousand items with the dot product;
* ``MinedNegatives`` -- uniform shared negatives plus hard negatives mined, per training sequence,
  from the model's own top items over the corpus, as encoded at the start of every epoch.

Objectives see the model through ``ObjectiveModel`` (what they need of it: its epoch, its similarity's query
head, its corpus index, the items training may see), not through ``RetrievalModule``, which builds them.

Negatives come only from the items training may see (``ObjectiveModel.training_item_ids``): every corpus
item, or under a cold split every item but the held-out cold ones. Uniform draws, the full softmax and mining
all keep to them; in-batch negatives are training positives, so they do too.

Shape legend: B sequences in the batch, L positions, M training queries (positions with a target),
R_S shared negatives, R_Q per-query negatives, R_B per-sequence negatives, N corpus size (item ids 1..N),
K mining depth.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

from rails_lightning.data.batches import TrainBatch
from rails_lightning.errors import ConfigError
from rails_lightning.retrieval import CorpusIndex, Exclusion, TopKRetriever
from rails_lightning.similarity.base import Similarity


class ObjectiveModel(Protocol):
    """What an objective sees of the model it trains (``RetrievalModule`` is one)."""

    @property
    def current_epoch(self) -> int: ...

    @property
    def similarity(self) -> Similarity:
        """Its ``query_representation`` turns query-encoder states into the queries a retriever searches with."""

    @property
    def corpus_index(self) -> CorpusIndex:
        """The corpus encoded with the current weights and the retrievers over it, shared with evaluation."""

    @property
    def training_item_ids(self) -> Tensor | None:
        """(W,) the ids of the items training may see, on the model's device, the only ones drawn as negatives;
        None: every corpus item (1..N)."""


class Negatives(NamedTuple):
    """A step's negatives: ids and their logQ (same shape) of each kind; None for a kind not drawn."""

    shared: Tensor | None = None  # (R_S,) ids scored against every query
    shared_log_q: Tensor | None = None  # (R_S,)
    per_query: Tensor | None = None  # (M, R_Q) ids, one row per query
    per_query_log_q: Tensor | None = None  # (M, R_Q)
    per_sequence: Tensor | None = None  # (B, R_B) ids, one row per training sequence
    per_sequence_log_q: Tensor | None = None  # (B, R_B)


@dataclass
class TrainingStep:
    """What an objective may look at to draw a step's negatives."""

    module: ObjectiveModel
    batch: TrainBatch
    states: Tensor  # (B, L, D) query-encoder states
    has_target: Tensor  # (B, L) the positions that enter the loss (M of them)
    positive_ids: Tensor  # (M,)


def _uniform(count: int, num_items: int, shape: tuple[int, ...], device: torch.device, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """``shape`` ids drawn uniformly from 1..N (or from the ``allowed`` ids, (W,)), and the log expected count of
    each among ``count`` draws."""
    if allowed is None:
        ids = torch.randint(1, num_items + 1, shape, device=device)
        return ids, torch.full(shape, math.log(count / num_items), device=device)
    ids = allowed[torch.randint(0, len(allowed), shape, device=device)]
    return ids, torch.full(shape, math.log(count / len(allowed)), device=device)


class TrainingObjective(ABC):
    """Base class: ``negatives(step)`` draws a step's negatives; ``on_train_epoch_start`` may refresh state.

    Built by ``RetrievalModule`` from a factory with the corpus size: ``Objective(num_items, **own options)``.
    """

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def on_train_epoch_start(self, module: ObjectiveModel) -> None:
        """Called at the start of every training epoch (after the previous epoch's validation)."""

    @abstractmethod
    def negatives(self, step: TrainingStep) -> Negatives:
        """This step's negatives."""


class SharedNegatives(TrainingObjective):
    """Sampled softmax with negatives shared by every query of the batch.

    Args:
        num_items: N (passed by the model).
        num_negatives: negatives drawn uniformly from the corpus.
        num_in_batch_negatives: negatives drawn from the batch's own positives (so distributed like the
            items' popularity).
        logq_correction: subtract the log expected count of each negative from its logit (what makes
            in-batch negatives an unbiased estimate; a constant for uniform ones).
    """

    def __init__(self, num_items: int, num_negatives: int = 128, num_in_batch_negatives: int = 0, logq_correction: bool = True) -> None:
        super().__init__(num_items)
        if num_negatives < 0 or num_in_batch_negatives < 0 or num_negatives + num_in_batch_negatives == 0:
            raise ConfigError(
                "SharedNegatives needs num_negatives >= 0 and num_in_batch_negatives >= 0 with at least one negative, got "
                f"{num_negatives} and {num_in_batch_negatives}"
            )
        self.num_negatives, self.num_in_batch_negatives = num_negatives, num_in_batch_negatives
        self.logq_correction = logq_correction

    def negatives(self, step: TrainingStep) -> Negatives:
        positive_ids = step.positive_ids
        ids, log_counts = [], []
        if self.num_negatives:
            uniform = _uniform(self.num_negatives, self.num_items, (self.num_negatives,), positive_ids.device, step.module.training_item_ids)
            ids.append(uniform[0])
            log_counts.append(uniform[1])
        if self.num_in_batch_negatives:
            pick = torch.randint(0, positive_ids.numel(), (self.num_in_batch_negatives,), device=positive_ids.device)
            sampled = positive_ids[pick]
            frequency = torch.bincount(positive_ids, minlength=self.num_items + 1)[sampled] / positive_ids.numel()
            ids.append(sampled)
            log_counts.append(torch.log(frequency * self.num_in_batch_negatives))
        log_q = torch.cat(log_counts)
        return Negatives(torch.cat(ids), log_q if self.logq_correction else torch.zeros_like(log_q))


class PerQueryNegatives(TrainingObjective):
    """Sampled softmax with uniform negatives drawn for every query (training position) separately.

    More distinct negatives per step than shared ones, at the price of scoring M x R_Q (query, item) pairs
    with items gathered per query (for the dot product, a batched product instead of one matmul).

    Args:
        num_items: N (passed by the model).
        num_negatives: R_Q, negatives per query.
        logq_correction: subtract log(R_Q / N) from every negative logit (a constant shift; off in the
            reference recipes that draw per position).
    """

    def __init__(self, num_items: int, num_negatives: int = 128, logq_correction: bool = False) -> None:
        super().__init__(num_items)
        if num_negatives <= 0:
            raise ConfigError(f"PerQueryNegatives needs num_negatives > 0, got {num_negatives}")
        self.num_negatives, self.logq_correction = num_negatives, logq_correction

    def negatives(self, step: TrainingStep) -> Negatives:
        device = step.positive_ids.device
        shape = (step.positive_ids.numel(), self.num_negatives)
        ids, log_q = _uniform(self.num_negatives, self.num_items, shape, device, step.module.training_item_ids)
        return Negatives(per_query=ids, per_query_log_q=log_q if self.logq_correction else torch.zeros_like(log_q))


class FullSoftmax(TrainingObjective):
    """The exact softmax over the whole corpus: every item training may see but the positive is a negative of
    every query.

    Costs M x N scores a step: cheap with the dot product for catalogues of a few thousand items; for
    MoL it is MoL's per-pair cost over the whole corpus.
    """

    def negatives(self, step: TrainingStep) -> Negatives:
        device = step.positive_ids.device
        ids = step.module.training_item_ids
        ids = torch.arange(1, self.num_items + 1, device=device) if ids is None else ids  # (N,) or (W,)
        return Negatives(ids, torch.zeros(len(ids), device=device))


class MinedNegatives(TrainingObjective):
    """Uniform shared negatives mixed with hard negatives mined from the model's own corpus ranking.

    At the start of every epoch from ``start_epoch`` on (that is, right after each validation, with the
    weights the evaluation callback has just scored) the objective takes the similarity's exact retriever
    over the corpus from the model's corpus index: the encoding the callback has just evaluated with,
    re-encoded only when no validation ran since the weights last changed. At every step each training
    sequence's query (its last position, detached) retrieves its top ``mining_depth`` items, its own
    history excluded as in evaluation; ``num_mined`` of them, drawn at random, become hard negatives of every
    training position of that sequence (per-sequence negatives). Drawing from a deeper list rather than taking
    the very top keeps fewer of the items the user would in fact have liked. Positions whose positive was
    mined get it masked as an accidental hit. No logQ for the mined part: it is not a draw from a distribution over the corpus.

    Before ``start_epoch`` (a random model's ranking is noise) the mined slots are filled with uniform
    per-sequence negatives, so every step has the same number of negatives.

    Args:
        num_items: N (passed by the model).
        num_negatives: uniform negatives shared by the batch (with logQ, as ``SharedNegatives``).
        num_mined: hard negatives per training sequence.
        mining_depth: K, how deep into each sequence's ranking the hard negatives are drawn from.
        start_epoch: the first epoch that mines.
    """

    def __init__(self, num_items: int, num_negatives: int = 128, num_mined: int = 32, mining_depth: int = 100, start_epoch: int = 1) -> None:
        super().__init__(num_items)
        if num_negatives < 0 or num_mined <= 0 or mining_depth < num_mined or start_epoch < 0:
            raise ConfigError(
                "MinedNegatives needs num_negatives >= 0, num_mined > 0, mining_depth >= num_mined and start_epoch >= 0, got "
                f"{num_negatives}, {num_mined}, {mining_depth}, {start_epoch}"
            )
        self.num_negatives, self.num_mined, self.mining_depth, self.start_epoch = num_negatives, num_mined, mining_depth, start_epoch
        self.retriever: TopKRetriever | None = None

    def on_train_epoch_start(self, module: ObjectiveModel) -> None:
        if module.current_epoch < self.start_epoch:
            self.retriever = None
        elif module.training_item_ids is None:
            self.retriever = module.corpus_index.exact_retriever()
        else:  # only the items training may see are mined
            self.retriever = module.corpus_index.subset_retriever(module.training_item_ids)

    def mine(self, step: TrainingStep) -> Tensor:
        """(B, num_mined) hard negatives of each training sequence; 0 where its ranking ran out."""
        batch, module = step.batch, step.module
        with torch.no_grad():
            queries = module.similarity.query_representation(step.states[:, -1].detach(), batch.user_ids)
            history = batch.input_ids > 0  # (B, L)
            offsets = torch.cat([history.new_zeros(1, dtype=torch.long), history.sum(1).cumsum(0)])
            exclusion = Exclusion(offsets, batch.input_ids[history])
            _, ranked = self.retriever.search(queries, self.mining_depth, exclusion)  # (B, K), 0 = none
        pick = torch.rand(ranked.shape, device=ranked.device).argsort(dim=1)[:, : self.num_mined]  # (B, num_mined)
        return ranked.gather(1, pick)

    def negatives(self, step: TrainingStep) -> Negatives:
        device = step.positive_ids.device
        allowed = step.module.training_item_ids
        shared, shared_log_q = _uniform(self.num_negatives, self.num_items, (self.num_negatives,), device, allowed) if self.num_negatives else (None, None)
        uniform, _ = _uniform(self.num_mined, self.num_items, (step.batch.input_ids.shape[0], self.num_mined), device, allowed)  # (B, num_mined)
        if self.retriever is None:
            mined = uniform
        else:
            mined = self.mine(step)  # (B, num_mined)
            mined = torch.where(mined > 0, mined, uniform)  # a ranking that ran out: uniform fill
        return Negatives(shared, shared_log_q, per_sequence=mined, per_sequence_log_q=torch.zeros(mined.shape, device=device))


ObjectiveFactory = Callable[[int], TrainingObjective]  # (num_items) -> objective
