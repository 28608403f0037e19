"""Synthetic data whose next-item distribution is known exactly: ``KnownTruthSource``.

The default generator (``synthetic.py``) rejects repeats with a bounded retry loop along cluster
rings, which makes the exact probability of the next item awkward to state. This module defines a
simpler process whose next-item distribution is a closed formula, so that a benchmark can report, next
to each model's HR@K, the HR@K of the best possible ranking (the Bayes-optimal one) -- and the same
formula is what the generator samples from, so the two cannot drift apart.

Generative process (everything drawn from ``np.random.default_rng(seed)``, in this order):

1. **Items -> clusters.** The ``N = num_items`` items are randomly permuted into
   ``C = num_clusters`` clusters of ``N // C`` or ``N // C + 1`` items. Inside cluster ``c`` item
   ``i`` has the popularity ``p_c(i) = (1 + r_i) ** -popularity_exponent / Z_c``, ``r_i`` a random
   rank inside the cluster (``p_c`` sums to 1 over the cluster).
2. **Users.** Each user draws ``K = interests_per_user`` distinct clusters uniformly at random (its
   interests ``c_1..c_K``) and interest weights ``w ~ Dirichlet(interest_concentration * 1_K)``.
   Sequence length ``L = min_sequence_length + Geometric(1 / (mean - min + 1)) - 1``, capped at half of
   the items of the user's clusters (never below ``min_sequence_length``).
3. **Sequences.** With ``H_t`` the items consumed before position ``t`` and ``a_t`` the interest of the
   last one (every item belongs to exactly one cluster, so ``a_t`` is read off the history), the
   interest weights of step ``t`` are ``pi_0 = w`` and
   ``pi_t(k) = (1 - stay_probability) * w_k + stay_probability * [k == a_t]``; the next item is

       P(i | H_t) = pi_t(k(i)) * p_{c_k(i)}(i) * [i not in H_t] / Z_t,

   ``k(i)`` the user's interest that holds ``i`` (items outside the user's clusters have probability 0)
   and ``Z_t`` the sum of the numerator over all items. That is a draw from the mixture
   ``sum_k pi_t(k) p_{c_k}`` with already consumed items rejected (the rejection is the
   renormalisation). It is drawn exactly, by one inverse-CDF draw over the user's candidates.

The switch ``interests_per_user``: with several interests the next-item distribution spreads over
several unrelated clusters, which one query vector scored by a dot product represents poorly when the
embedding dimension is small next to the number of clusters, and a Mixture-of-Logits (several query
embeddings) represents well. With ``interests_per_user=1`` it is ``p_c`` restricted to the unconsumed
items of one cluster: a query vector pointing at the cluster (plus per-item popularity) is enough.
``stay_probability`` (0 by default: an exchangeable mixture) adds a sequential signal.

The truth is the oracle's: it knows each user's clusters and weights, which a model has to infer
from the history. The Bayes-optimal HR@K computed here is therefore an upper bound of what any model
can reach, not necessarily a reachable one. With the leave-one-out split the validation and test
queries are positions ``L - 2`` and ``L - 1`` of a sequence whose length was drawn before its items,
so their targets are draws from ``P(. | H_t)`` like any other position.

For a DataModule built on this source, :func:`query_truth` returns the true next-item distribution of
every validation or test query over the corpus ids (the source always puts every item in the corpus),
and :func:`bayes_optimal_hit_rate`, :func:`bayes_optimal_ranking` and :func:`expected_hit_rate` turn it
into the expected hit rate of the best ranking and of any other ranking. The distributions are dense
``(Q, N + 1)`` float64 arrays: meant for the small catalogues of a known-truth benchmark.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from rails_lightning.data.sequences import InteractionLog, gather_ranges
from rails_lightning.data.source import InteractionSource
from rails_lightning.data.synthetic import ClusterTitles

__all__ = [
    "KnownTruthSource", "KnownTruthWorld", "KnownTruthInteractions", "QueryTruth",
    "query_truth", "bayes_optimal_ranking", "bayes_optimal_hit_rate", "expected_hit_rate",
]


@dataclass(frozen=True)
class KnownTruthWorld:
    """The latent parameters of the process (raw ids), and the exact next-item distribution they imply.

    Attributes:
        item_cluster: ``(N,)`` int64 cluster of every item.
        item_popularity: ``(N,)`` float64 ``p_c(i)``, the item's probability inside its cluster.
        cluster_items: ``(C, S)`` int64 the items of every cluster, ``-1``-padded to the largest size S.
        item_slot: ``(N,)`` int64 position of every item in its cluster's row of ``cluster_items``.
        user_interests: ``(U, K)`` int64 every user's distinct clusters.
        user_weights: ``(U, K)`` float64 every user's interest weights (rows sum to 1).
        stay_probability: weight moved to the interest of the last item.
    """

    item_cluster: np.ndarray
    item_popularity: np.ndarray
    cluster_items: np.ndarray
    item_slot: np.ndarray
    user_interests: np.ndarray
    user_weights: np.ndarray
    stay_probability: float

    @property
    def num_items(self) -> int:
        return len(self.item_cluster)

    def candidates(self, users: np.ndarray) -> np.ndarray:
        """``(Q, K * S)`` the items each user can consume, interest by interest (``-1`` = padding)."""
        return self.cluster_items[self.user_interests[users]].reshape(len(users), -1)

    def candidate_distribution(self, users: np.ndarray, last_interest: np.ndarray, consumed: np.ndarray) -> np.ndarray:
        """``P(i | H_t)`` over each user's candidates (the formula of the module docstring).

        Args:
            users: ``(Q,)`` raw user ids.
            last_interest: ``(Q,)`` interest index ``0..K-1`` of the user's last item, ``-1`` for an
                empty history.
            consumed: ``(Q, K * S)`` bool, candidates already in the history.

        Returns:
            ``(Q, K * S)`` float64, rows summing to 1 (0 on padding and consumed candidates).
        """
        weights = self.user_weights[users]  # (Q, K)
        has_last = last_interest >= 0
        stay = np.zeros_like(weights)
        stay[np.flatnonzero(has_last), last_interest[has_last]] = 1.0
        step_weights = np.where(
            has_last[:, None], (1.0 - self.stay_probability) * weights + self.stay_probability * stay, weights
        )
        items = self.candidates(users)  # (Q, K * S)
        num_slots = self.cluster_items.shape[1]
        popularity = np.where(items >= 0, self.item_popularity[np.maximum(items, 0)], 0.0)
        mass = np.repeat(step_weights, num_slots, axis=1) * popularity * ~consumed
        return mass / mass.sum(axis=1, keepdims=True)

    def history_state(self, users: np.ndarray, history_offsets: np.ndarray, history_items: np.ndarray):
        """The state the next item depends on, read off the histories.

        Args:
            users: ``(Q,)`` raw user ids.
            history_offsets: ``(Q + 1,)`` CSR offsets: query ``q``'s history, in time order, is
                ``history_items[history_offsets[q]:history_offsets[q + 1]]``.
            history_items: ``(H,)`` raw item ids.

        Returns:
            ``(last_interest (Q,), consumed (Q, K * S))`` as :meth:`candidate_distribution` takes them.

        Raises:
            ValueError: a history item outside the user's clusters (not a history of this process).
        """
        num_queries, num_interests = len(users), self.user_interests.shape[1]
        query_of = np.repeat(np.arange(num_queries), np.diff(history_offsets))
        matches = self.user_interests[users[query_of]] == self.item_cluster[history_items][:, None]  # (H, K)
        if not matches.any(axis=1).all():
            raise ValueError("a history item lies outside its user's interests: not a history of this process")
        interest_of = matches.argmax(axis=1)
        consumed = np.zeros((num_queries, num_interests * self.cluster_items.shape[1]), dtype=bool)
        consumed[query_of, interest_of * self.cluster_items.shape[1] + self.item_slot[history_items]] = True
        last_interest = np.full(num_queries, -1, dtype=np.int64)
        nonempty = np.diff(history_offsets) > 0
        last_interest[nonempty] = interest_of[history_offsets[1:][nonempty] - 1]
        return last_interest, consumed

    def next_item_probabilities(self, users: np.ndarray, history_offsets: np.ndarray, history_items: np.ndarray) -> np.ndarray:
        """``(Q, N)`` float64 true distribution of the next item of every query over the raw item ids.

        Arguments as :meth:`history_state`. Rows sum to 1; history items get 0.
        """
        last_interest, consumed = self.history_state(users, history_offsets, history_items)
        distribution = self.candidate_distribution(users, last_interest, consumed)
        items = self.candidates(users)
        rows, columns = np.nonzero(items >= 0)
        probabilities = np.zeros((len(users), self.num_items))
        probabilities[rows, items[rows, columns]] = distribution[rows, columns]
        return probabilities


@dataclass(frozen=True)
class KnownTruthInteractions:
    """The generated log (sorted by user, then position) and the world it was drawn from.

    Attributes:
        user_ids: ``(M,)`` int64 raw user ids in ``[0, num_users)``.
        item_ids: ``(M,)`` int64 raw item ids in ``[0, num_items)``.
        positions: ``(M,)`` int64 position in the user's sequence, ``0..len-1``.
        world: the latent parameters and the exact next-item distribution.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    positions: np.ndarray
    world: KnownTruthWorld


class KnownTruthSource(InteractionSource):
    """Synthetic log with a known next-item distribution (the process is in the module docstring).

    Every item is in the corpus (also items nobody consumed), so that the truth and the models rank
    the same items. The options are checked when the log is generated.

    Args:
        num_users: number of users (each gets one sequence).
        num_items: number of items.
        num_clusters: number of item clusters.
        interests_per_user: distinct clusters per user; 1 is the single-interest switch.
        interest_concentration: Dirichlet concentration of the interest weights (large: nearly equal
            weights; small: one interest dominates).
        mean_sequence_length: mean number of interactions per user before capping.
        min_sequence_length: minimum number of interactions per user.
        stay_probability: weight moved to the interest of the user's last item at each step.
        popularity_exponent: Zipf exponent of the popularity inside a cluster.
        seed: generator seed; the same options give the same log and world.
    """

    def __init__(
        self,
        num_users: int = 2000,
        num_items: int = 1000,
        num_clusters: int = 40,
        interests_per_user: int = 3,
        interest_concentration: float = 5.0,
        mean_sequence_length: int = 15,
        min_sequence_length: int = 5,
        stay_probability: float = 0.0,
        popularity_exponent: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.options = dict(
            num_users=num_users, num_items=num_items, num_clusters=num_clusters,
            interests_per_user=interests_per_user, interest_concentration=interest_concentration,
            mean_sequence_length=mean_sequence_length, min_sequence_length=min_sequence_length,
            stay_probability=stay_probability, popularity_exponent=popularity_exponent, seed=seed,
        )

    @property
    def description(self) -> str:
        return "known_truth(" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + ")"

    @cached_property
    def generated(self) -> KnownTruthInteractions:
        """The log and its world, generated once (``load`` and :func:`query_truth` share them)."""
        return generate_known_truth(**self.options)

    @property
    def world(self) -> KnownTruthWorld:
        return self.generated.world

    def load(self) -> InteractionLog:
        data = self.generated
        return InteractionLog(
            user_ids=data.user_ids,
            item_ids=data.item_ids,
            order=data.positions,
            name=self.description,
            item_titles=ClusterTitles(data.world.item_cluster),
            item_clusters=data.world.item_cluster,
            catalogue=np.arange(data.world.num_items),
        )


def _validate(options: dict) -> dict:
    out = dict(options)
    for name in ("num_users", "num_items", "num_clusters", "interests_per_user", "mean_sequence_length", "min_sequence_length"):
        value = options[name]
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        out[name] = value
    if out["num_items"] < out["num_clusters"]:
        raise ValueError(f"num_items ({out['num_items']}) must be >= num_clusters ({out['num_clusters']})")
    if out["interests_per_user"] > out["num_clusters"]:
        raise ValueError(f"interests_per_user ({out['interests_per_user']}) must be <= num_clusters ({out['num_clusters']})")
    if out["mean_sequence_length"] < out["min_sequence_length"]:
        raise ValueError(
            f"mean_sequence_length ({out['mean_sequence_length']}) must be >= min_sequence_length ({out['min_sequence_length']})"
        )
    smallest_pool = out["interests_per_user"] * (out["num_items"] // out["num_clusters"])
    if smallest_pool // 2 < out["min_sequence_length"]:
        raise ValueError(
            f"clusters are too small: half of interests_per_user * (num_items // num_clusters) = {smallest_pool // 2} "
            f"< min_sequence_length ({out['min_sequence_length']}); use more items or fewer clusters"
        )
    stay = float(options["stay_probability"])
    if not 0.0 <= stay <= 1.0:
        raise ValueError(f"stay_probability must be in [0, 1], got {stay}")
    out["stay_probability"] = stay
    for name in ("interest_concentration", "popularity_exponent"):
        value = float(options[name])
        if not np.isfinite(value) or value < 0.0 or (name == "interest_concentration" and value == 0.0):
            raise ValueError(f"{name} must be finite and {'> 0' if name == 'interest_concentration' else '>= 0'}, got {value}")
        out[name] = value
    return out


def generate_known_truth(**options) -> KnownTruthInteractions:
    """Draw the world and the log (the options of :class:`KnownTruthSource`, which holds the defaults).

    Raises:
        ValueError: non-positive sizes, ``num_items < num_clusters``, ``interests_per_user > num_clusters``,
            ``mean < min`` sequence length, clusters too small for ``min_sequence_length``, a probability
            outside [0, 1] or a non-positive concentration.
    """
    a = _validate(options)
    U, N, C, K = a["num_users"], a["num_items"], a["num_clusters"], a["interests_per_user"]
    rng = np.random.default_rng(a["seed"])

    # ---- 1. items -> clusters of N // C or N // C + 1 items, Zipf popularity over a random rank.
    sizes = np.full(C, N // C, dtype=np.int64)
    sizes[: N % C] += 1
    item_cluster = np.repeat(np.arange(C, dtype=np.int64), sizes)[rng.permutation(N)]
    by_cluster = np.argsort(item_cluster, kind="stable")  # items grouped by cluster
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    item_slot = np.empty(N, dtype=np.int64)
    item_slot[by_cluster] = np.arange(N) - np.repeat(starts, sizes)
    cluster_items = np.full((C, int(sizes.max())), -1, dtype=np.int64)
    cluster_items[item_cluster[by_cluster], item_slot[by_cluster]] = by_cluster
    random_rank = np.empty(N, dtype=np.int64)
    random_rank[by_cluster] = np.concatenate([rng.permutation(int(s)) for s in sizes])
    weight = (1.0 + random_rank) ** -a["popularity_exponent"]
    item_popularity = weight / np.bincount(item_cluster, weights=weight, minlength=C)[item_cluster]

    # ---- 2. users: K distinct uniform clusters, Dirichlet weights, lengths.
    user_interests = np.argsort(rng.random((U, C)), axis=1)[:, :K].astype(np.int64)
    user_weights = rng.dirichlet(np.full(K, a["interest_concentration"]), size=U)
    min_len, mean_len = a["min_sequence_length"], a["mean_sequence_length"]
    lengths = min_len + rng.geometric(1.0 / (mean_len - min_len + 1), size=U).astype(np.int64) - 1
    pool = sizes[user_interests].sum(axis=1)
    lengths = np.maximum(np.minimum(lengths, pool // 2), min_len)
    world = KnownTruthWorld(
        item_cluster=item_cluster, item_popularity=item_popularity, cluster_items=cluster_items,
        item_slot=item_slot, user_interests=user_interests, user_weights=user_weights,
        stay_probability=a["stay_probability"],
    )

    # ---- 3. sequences, one position at a time for every user still going, each an exact inverse-CDF
    # draw from the same distribution that `next_item_probabilities` reports.
    all_users = np.arange(U)
    candidates = world.candidates(all_users)  # (U, K * S)
    consumed = np.zeros(candidates.shape, dtype=bool)
    last_interest = np.full(U, -1, dtype=np.int64)
    sequences = np.full((U, int(lengths.max())), -1, dtype=np.int64)
    num_slots = cluster_items.shape[1]
    for t in range(sequences.shape[1]):
        users = np.flatnonzero(lengths > t)
        distribution = world.candidate_distribution(users, last_interest[users], consumed[users])
        cumulative = np.cumsum(distribution, axis=1)
        column = (cumulative <= rng.random(len(users))[:, None] * cumulative[:, -1:]).sum(axis=1)
        # Rounding could step past the last candidate with mass: fall back on it.
        last_positive = distribution.shape[1] - 1 - np.argmax(distribution[:, ::-1] > 0, axis=1)
        column = np.minimum(column, last_positive)
        sequences[users, t] = candidates[users, column]
        consumed[users, column] = True
        last_interest[users] = column // num_slots

    # ---- 4. flat, sorted by user then position.
    valid = np.arange(sequences.shape[1])[None, :] < lengths[:, None]
    return KnownTruthInteractions(
        user_ids=np.repeat(all_users.astype(np.int64), lengths),
        item_ids=sequences[valid],
        positions=np.nonzero(valid)[1].astype(np.int64),
        world=world,
    )


@dataclass(frozen=True)
class QueryTruth:
    """The true next-item distribution of every query of a stage, over the DataModule's item ids.

    Attributes:
        probabilities: ``(Q, N + 1)`` float64; column 0 (padding) and the query's history are 0, rows sum to 1.
        targets: ``(Q,)`` int64 the item the process actually drew (the query's target).
    """

    probabilities: np.ndarray
    targets: np.ndarray


def query_truth(datamodule, stage: str = "test") -> QueryTruth:
    """True next-item distributions of the ``"val"`` or ``"test"`` queries of an ``InteractionDataModule``
    whose source is a :class:`KnownTruthSource` (single-target queries: the leave-one-out split)."""
    source = datamodule.source
    if not isinstance(source, KnownTruthSource):
        raise TypeError(f"query_truth needs a KnownTruthSource, got {type(source).__name__}")
    store, queries = datamodule.store, (datamodule.split.val if stage == "val" else datamodule.split.test)
    if queries.max_targets != 1:
        raise ValueError("query_truth needs one target per query (the leave-one-out split)")
    history_offsets, history = gather_ranges(store.items, store.offsets[queries.users], queries.history_end)
    raw_users = store.user_raw_ids[queries.users]
    raw_probabilities = source.world.next_item_probabilities(raw_users, history_offsets, store.item_raw_ids[history])
    probabilities = np.zeros((len(queries), store.num_items + 1))
    probabilities[:, 1:] = raw_probabilities[:, store.item_raw_ids[1:]]  # corpus id -> raw id
    return QueryTruth(probabilities=probabilities, targets=store.items[queries.history_end])


def bayes_optimal_ranking(probabilities: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` int64 the ``k`` most probable items of every row of ``(Q, N + 1)`` probabilities, best first."""
    top = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(probabilities, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def expected_hit_rate(probabilities: np.ndarray, topk_ids: np.ndarray) -> float:
    """Expected HR@k of a ranking: the mean over queries of the true probability mass of its ``(Q, k)`` ids
    (repeated ids count once; id 0 is padding and has probability 0)."""
    ids = np.sort(topk_ids, axis=1)
    first = np.ones(ids.shape, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return float((np.take_along_axis(probabilities, ids, axis=1) * first).sum(axis=1).mean())


def bayes_optimal_hit_rate(probabilities: np.ndarray, k: int) -> float:
    """The largest expected HR@k any ranking can reach: the mean over queries of the sum of the ``k``
    largest true probabilities."""
    return expected_hit_rate(probabilities, bayes_optimal_ranking(probabilities, k))
