"""Deterministic synthetic interaction log, the framework's default dataset: ``SyntheticSource``.

``SyntheticSource`` holds the options (and their defaults); ``generate_interactions`` draws the
log from them.

The log is built so that

* a user's taste is a *mixture* of a few unrelated interests (item clusters), which one
  user embedding scored by a single dot product represents poorly and a Mixture-of-Logits
  model (several query embeddings per user) represents well;
* the order of a sequence carries signal (the active interest persists, and within an
  interest users walk forward along an item order), so a sequence model (SASRec-style)
  beats a popularity baseline by a wide margin;
* global popularity is skewed but a weak predictor of the next item.

Generative process (everything drawn from ``np.random.default_rng(seed)``):

1. **Items -> clusters.** Every cluster first gets ``max(1, (num_items // num_clusters) // 2)``
   items; the rest are spread multinomially with per-cluster weights ``U(0.5, 1.5)``
   (balanced-ish). Items are randomly permuted into clusters. Inside a cluster the items
   form a *ring* (their order, used for sequential locality) and get a Zipf-like
   popularity ``(1 + r) ** -popularity_exponent`` where ``r`` is a random rank inside the
   cluster (independent of the ring order).
2. **Users.** Each user draws ``interests_per_user`` *distinct* clusters, mildly
   popularity-skewed (cluster weight ``(1 + rank) ** -0.5`` for a random cluster rank;
   sampled without replacement). Sequence length is
   ``min_sequence_length + Geometric(1 / (mean - min + 1)) - 1`` (mean ``mean_sequence_length``
   before capping), capped at ``10 * mean_sequence_length`` and at half the number of items
   in the user's clusters (but never below ``min_sequence_length``), so the realised mean
   is slightly lower (28.1 for the defaults).
3. **Sequences**, one position at a time for all users at once (vectorised over users):
   the first interest is uniform among the user's interests; afterwards the active
   interest is kept with ``stay_probability``, otherwise replaced by one of the user's
   *other* interests, uniformly (a single interest is always kept). Given the interest's cluster, the next item is, with
   probability ``local_probability`` (and if the user already consumed something in that
   interest), a *local step*: 1, 2 or 3 positions (probabilities 0.6/0.3/0.1) forward
   along the ring from the last item the user consumed in that interest; otherwise a
   popularity-weighted draw from the cluster.
4. **No repeats.** A candidate the user has already consumed is rejected: popularity
   draws are redrawn (up to 16 times), after which -- and for local steps from the start --
   the candidate advances one ring position at a time (up to 48 more tries); if that still
   fails the interest is treated as exhausted and the same is tried in the user's next
   interest, and so on. Only if every interest fails is the repeat kept, which needs a user
   to have consumed (nearly) all of the reachable items of all their interests; sequences
   are capped at half of those items, so in practice no repeat occurs (none for the
   defaults, for seeds 0-4, nor in the tighter configurations of the tests). The documented
   bound, tested, is :data:`MAX_REPEAT_RATE` (0.1% of interactions).

The output is sorted by user id, then position (time order).

With the defaults of ``SyntheticSource``: 84,447 interactions, mean length
28.1 (5..91), no repeats; the top 10% of items get 31% of the interactions; 70% of
consecutive pairs share a cluster. Leave-one-out HR@10 (last item, history excluded, full
corpus): popularity baseline 0.035; an oracle ranking the user's clusters by popularity 0.19;
a count-based item-to-next-item transition model 0.48. Generation is array operations over all
users at once (no per-user Python loop), so corpora of a million items and more are practical.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from rails_lightning.data.sequences import InteractionLog
from rails_lightning.data.source import InteractionSource

__all__ = ["SyntheticSource", "SyntheticInteractions", "generate_interactions", "MAX_REPEAT_RATE"]

#: Documented upper bound on the fraction of interactions that repeat an item already in the
#: user's sequence (for clusters several times larger than a sequence; 0 for the defaults).
MAX_REPEAT_RATE = 1e-3

_LOCAL_OFFSETS = np.array([1, 2, 3], dtype=np.int64)
_LOCAL_OFFSET_PROBS = np.array([0.6, 0.3, 0.1])
_CLUSTER_POPULARITY_EXPONENT = 0.5
_POPULARITY_RETRIES = 16
_RING_RETRIES = 48
_GUMBEL_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SyntheticInteractions:
    """An interaction log, sorted by user then position.

    Attributes:
        user_ids: ``(M,)`` int64 raw user ids in ``[0, num_users)``.
        item_ids: ``(M,)`` int64 raw item ids in ``[0, num_items)``.
        positions: ``(M,)`` int64 position of the interaction in its user's sequence,
            ``0..len-1`` (time order).
        item_cluster: ``(num_items,)`` int64 cluster of every item.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    positions: np.ndarray
    item_cluster: np.ndarray

    @property
    def num_interactions(self) -> int:
        return int(self.user_ids.shape[0])


class SyntheticSource(InteractionSource):
    """The default dataset: a deterministic synthetic log of users with several interests.

    Items fall in clusters, each user draws from a few of them (the generative process is in
    the module docstring). The options are checked when the log is generated (``load`` or
    ``generate``).

    Args:
        num_users: number of users (each gets one sequence).
        num_items: number of items.
        num_clusters: number of item clusters (interests).
        interests_per_user: distinct clusters each user draws items from.
        mean_sequence_length: mean number of interactions per user before capping (the realised
            mean is a bit lower).
        min_sequence_length: minimum number of interactions per user.
        stay_probability: chance that the next item continues the current interest (otherwise
            another of the user's interests, uniformly).
        local_probability: chance that the next item is a short forward step along the cluster's
            ring from the user's last item in that interest (the sequential signal).
        popularity_exponent: Zipf exponent of the item popularity inside a cluster.
        seed: generator seed; the same options give the same log.
        include_unseen_items: the corpus is every one of the ``num_items`` items, also those no user
            consumed (a catalogue larger than its log, e.g. a 1M-item corpus from a small log); by
            default it is the consumed items.
    """

    def __init__(
        self,
        num_users: int = 3000,
        num_items: int = 2000,
        num_clusters: int = 40,
        interests_per_user: int = 3,
        mean_sequence_length: int = 30,
        min_sequence_length: int = 5,
        stay_probability: float = 0.7,
        local_probability: float = 0.5,
        popularity_exponent: float = 1.0,
        seed: int = 0,
        include_unseen_items: bool = False,
    ) -> None:
        self.include_unseen_items = include_unseen_items
        self.options = dict(
            num_users=num_users,
            num_items=num_items,
            num_clusters=num_clusters,
            interests_per_user=interests_per_user,
            mean_sequence_length=mean_sequence_length,
            min_sequence_length=min_sequence_length,
            stay_probability=stay_probability,
            local_probability=local_probability,
            popularity_exponent=popularity_exponent,
            seed=seed,
        )

    @property
    def description(self) -> str:
        unseen = ", include_unseen_items=True" if self.include_unseen_items else ""
        return "synthetic(" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + unseen + ")"

    def generate(self) -> SyntheticInteractions:
        """The raw generator output: ids, positions and the cluster of every item."""
        return generate_interactions(**self.options)

    def load(self) -> InteractionLog:
        data = self.generate()
        return InteractionLog(
            user_ids=data.user_ids,
            item_ids=data.item_ids,
            order=data.positions,
            name=self.description,
            item_titles=ClusterTitles(data.item_cluster),
            item_clusters=data.item_cluster,
            catalogue=np.arange(len(data.item_cluster)) if self.include_unseen_items else None,
        )


class ClusterTitles(Mapping):
    """``item i (cluster c)`` for every raw item id, made when asked for: a dict of them would hold
    millions of strings for a million-item corpus."""

    def __init__(self, item_cluster: np.ndarray) -> None:
        self.item_cluster = item_cluster

    def __getitem__(self, item: int) -> str:
        if not 0 <= item < len(self.item_cluster):
            raise KeyError(item)
        return f"item {item} (cluster {self.item_cluster[item]})"

    def __iter__(self):
        return iter(range(len(self.item_cluster)))

    def __len__(self) -> int:
        return len(self.item_cluster)


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _validate(
    num_users, num_items, num_clusters, interests_per_user, mean_sequence_length,
    min_sequence_length, stay_probability, local_probability, popularity_exponent,
):
    ints = {
        "num_users": num_users,
        "num_items": num_items,
        "num_clusters": num_clusters,
        "interests_per_user": interests_per_user,
        "mean_sequence_length": mean_sequence_length,
        "min_sequence_length": min_sequence_length,
    }
    out = {}
    for name, value in ints.items():
        v = _as_int(name, value)
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
        out[name] = v
    if out["num_items"] < out["num_clusters"]:
        raise ValueError(
            f"num_items ({out['num_items']}) must be >= num_clusters ({out['num_clusters']})"
        )
    if out["num_items"] >= 2**31:
        raise ValueError(f"num_items must be < 2**31, got {out['num_items']}")
    if out["interests_per_user"] > out["num_clusters"]:
        raise ValueError(
            f"interests_per_user ({out['interests_per_user']}) must be <= num_clusters "
            f"({out['num_clusters']})"
        )
    if out["mean_sequence_length"] < out["min_sequence_length"]:
        raise ValueError(
            f"mean_sequence_length ({out['mean_sequence_length']}) must be >= "
            f"min_sequence_length ({out['min_sequence_length']})"
        )
    min_cluster_size = max(1, (out["num_items"] // out["num_clusters"]) // 2)
    if out["interests_per_user"] * min_cluster_size < out["min_sequence_length"]:
        raise ValueError(
            "clusters are too small to hold a sequence without repeats: "
            f"interests_per_user * max(1, (num_items // num_clusters) // 2) = "
            f"{out['interests_per_user'] * min_cluster_size} < min_sequence_length "
            f"({out['min_sequence_length']}); use more items, fewer clusters or more interests"
        )
    for name, p in (("stay_probability", stay_probability), ("local_probability", local_probability)):
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
        out[name] = p
    popularity_exponent = float(popularity_exponent)
    if not (np.isfinite(popularity_exponent) and popularity_exponent >= 0.0):
        raise ValueError(f"popularity_exponent must be finite and >= 0, got {popularity_exponent}")
    out["popularity_exponent"] = popularity_exponent
    out["min_cluster_size"] = min_cluster_size
    return out


def _distinct_clusters(rng, num_users, num_clusters, k, weights):
    """(num_users, k) distinct clusters per user, drawn by weight without replacement.

    Few interests out of many clusters: column by column, redrawing collisions (a handful of
    rounds). Otherwise the Gumbel-top-k trick, in chunks of users to bound memory.
    """
    p = weights / weights.sum()
    out = np.empty((num_users, k), dtype=np.int64)
    if 4 * k <= num_clusters:
        cum = np.cumsum(p)
        cum[-1] = 1.0
        for j in range(k):
            todo = np.arange(num_users)
            while todo.size:
                draw = np.minimum(np.searchsorted(cum, rng.random(todo.size), side="right"), num_clusters - 1)
                out[todo, j] = draw
                todo = todo[(out[todo, :j] == draw[:, None]).any(axis=1)]
        return out
    log_w = np.log(p)
    chunk = max(1, _GUMBEL_CHUNK_ELEMENTS // num_clusters)
    for lo in range(0, num_users, chunk):
        hi = min(num_users, lo + chunk)
        keys = log_w[None, :] + rng.gumbel(size=(hi - lo, num_clusters))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        top_keys = np.take_along_axis(keys, top, axis=1)
        out[lo:hi] = np.take_along_axis(top, np.argsort(-top_keys, axis=1, kind="stable"), axis=1)
    return out


def generate_interactions(
    *,
    num_users: int,
    num_items: int,
    num_clusters: int,
    interests_per_user: int,
    mean_sequence_length: int,
    min_sequence_length: int,
    stay_probability: float,
    local_probability: float,
    popularity_exponent: float,
    seed: int,
) -> SyntheticInteractions:
    """Generate a seeded synthetic interaction log (see the module docstring for the process).

    The arguments are the options of :class:`SyntheticSource`, which documents them and holds
    their defaults: ``SyntheticSource(...).generate()`` calls this.

    Raises:
        ValueError: for non-positive sizes, ``num_items < num_clusters``,
            ``interests_per_user > num_clusters``, ``mean < min`` sequence length,
            clusters too small for ``min_sequence_length``, or probabilities outside [0, 1].
    """
    a = _validate(
        num_users, num_items, num_clusters, interests_per_user, mean_sequence_length,
        min_sequence_length, stay_probability, local_probability, popularity_exponent,
    )
    U, N, C, K = a["num_users"], a["num_items"], a["num_clusters"], a["interests_per_user"]
    mean_len, min_len = a["mean_sequence_length"], a["min_sequence_length"]
    stay, local_p = a["stay_probability"], a["local_probability"]
    rng = np.random.default_rng(seed)

    # ---- 1. items -> clusters. Items live in "slots" grouped by cluster: cluster c owns
    # slots [starts[c], starts[c] + sizes[c]); the slot offset inside the cluster is the
    # item's position on the cluster's ring.
    floor = a["min_cluster_size"]
    size_weights = rng.uniform(0.5, 1.5, size=C)
    sizes = floor + rng.multinomial(N - floor * C, size_weights / size_weights.sum()).astype(np.int64)
    starts = np.zeros(C, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    slot_cluster = np.repeat(np.arange(C, dtype=np.int64), sizes)
    slot_to_item = rng.permutation(N).astype(np.int64)
    item_cluster = np.empty(N, dtype=np.int64)
    item_cluster[slot_to_item] = slot_cluster

    # Zipf-like popularity over a random rank inside each cluster.
    shuffled = np.argsort(slot_cluster + rng.random(N), kind="stable")  # grouped by cluster
    rank = np.empty(N, dtype=np.int64)
    rank[shuffled] = np.arange(N, dtype=np.int64) - starts[slot_cluster[shuffled]]
    slot_weight = (1.0 + rank) ** -a["popularity_exponent"]
    cum = np.cumsum(slot_weight)
    cluster_end_cum = cum[starts + sizes - 1]
    cluster_begin_cum = cluster_end_cum - np.add.reduceat(slot_weight, starts)

    def popularity_draw(clusters: np.ndarray) -> np.ndarray:
        lo = cluster_begin_cum[clusters]
        u = lo + rng.random(clusters.shape[0]) * (cluster_end_cum[clusters] - lo)
        slot = np.searchsorted(cum, u, side="right")
        return np.clip(slot, starts[clusters], starts[clusters] + sizes[clusters] - 1)

    # ---- 2. users: distinct, mildly popularity-skewed interests and sequence lengths.
    cluster_w = (1.0 + rng.permutation(C)) ** -_CLUSTER_POPULARITY_EXPONENT
    interests = _distinct_clusters(rng, U, C, K, cluster_w)  # (U, K)
    lengths = min_len + rng.geometric(1.0 / (mean_len - min_len + 1), size=U).astype(np.int64) - 1
    pool = sizes[interests].sum(axis=1)
    lengths = np.maximum(np.minimum(np.minimum(lengths, pool // 2), 10 * mean_len), min_len)

    # Process users by decreasing length so that the users still active at step t are a
    # prefix: every per-step operation works on views.
    proc = np.argsort(-lengths, kind="stable")
    proc_len = lengths[proc]
    proc_interests = interests[proc]
    proc_sizes = sizes[proc_interests]   # (U, K)
    proc_starts = starts[proc_interests]  # (U, K)
    max_len = int(proc_len[0])
    # active[t] = number of users whose sequence has a position t.
    active = U - np.searchsorted(proc_len[::-1], np.arange(max_len), side="right")

    history = np.empty((U, max_len), dtype=np.int32)  # slots, row = processing order
    last_pos = np.full((U, K), -1, dtype=np.int64)      # last ring position per interest
    slot_now = np.zeros(U, dtype=np.int64)               # active interest index 0..K-1

    # ---- 3. sequences, one position at a time.
    for t in range(max_len):
        n = int(active[t])
        rows = np.arange(n)
        if t == 0:
            slot_now[:n] = rng.integers(0, K, size=n)
        elif K > 1:
            switch = rng.random(n) >= stay
            shift = rng.integers(1, K, size=n)
            slot_now[:n] = np.where(switch, (slot_now[:n] + shift) % K, slot_now[:n])
        s = slot_now[:n]  # a view: fallbacks below that switch interest update slot_now
        c = proc_interests[rows, s]
        size_c = proc_sizes[rows, s]
        start_c = proc_starts[rows, s]
        prev = last_pos[rows, s]
        is_local = (prev >= 0) & (rng.random(n) < local_p)
        offsets = rng.choice(_LOCAL_OFFSETS, size=n, p=_LOCAL_OFFSET_PROBS)
        cand = np.where(is_local, start_c + (prev + offsets) % np.maximum(size_c, 1), popularity_draw(c))

        if t > 0:
            bad = np.flatnonzero((history[:n, :t] == cand[:, None]).any(axis=1))
            for attempt in range(K):
                if attempt > 0 and bad.size:
                    # The interest looks exhausted: move on to the user's next interest.
                    s[bad] = (s[bad] + 1) % K
                    c[bad] = proc_interests[bad, s[bad]]
                    size_c[bad] = proc_sizes[bad, s[bad]]
                    start_c[bad] = proc_starts[bad, s[bad]]
                    is_local[bad] = False
                    cand[bad] = popularity_draw(c[bad])
                    bad = bad[(history[bad, :t] == cand[bad, None]).any(axis=1)]
                for r in range(_POPULARITY_RETRIES + _RING_RETRIES):
                    if bad.size == 0:
                        break
                    ring = is_local[bad] | (r >= _POPULARITY_RETRIES)
                    nxt = start_c[bad] + (cand[bad] - start_c[bad] + 1) % size_c[bad]
                    if not ring.all():
                        nxt = np.where(ring, nxt, popularity_draw(c[bad]))
                    cand[bad] = nxt
                    bad = bad[(history[bad, :t] == nxt[:, None]).any(axis=1)]
                if bad.size == 0:
                    break
        history[:n, t] = cand
        last_pos[rows, s] = cand - start_c

    # ---- 4. back to raw ids, sorted by user id then position.
    offsets_by_user = np.zeros(U, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets_by_user[1:])
    M = int(lengths.sum())
    valid = np.arange(max_len)[None, :] < proc_len[:, None]
    flat_slots = history[valid]  # row-major: processing order, then position
    row_pos = np.broadcast_to(np.arange(max_len, dtype=np.int64), (U, max_len))[valid]
    dest = np.repeat(offsets_by_user[proc], proc_len) + row_pos
    item_ids = np.empty(M, dtype=np.int64)
    item_ids[dest] = slot_to_item[flat_slots]
    user_ids = np.repeat(np.arange(U, dtype=np.int64), lengths)
    positions = np.arange(M, dtype=np.int64) - np.repeat(offsets_by_user, lengths)
    return SyntheticInteractions(
        user_ids=user_ids, item_ids=item_ids, positions=positions, item_cluster=item_cluster
    )
