"""The known-truth synthetic source: the reported next-item distribution is a distribution, matches a
direct reading of the process, is what the generator samples (frequency checks that can fail), and
the Bayes-optimal ranking beats every other; the interests switch changes what it should."""

import dataclasses

import numpy as np
import pytest

from rails_lightning.data import InteractionDataModule, KnownTruthSource
from rails_lightning.data.known_truth import (
    bayes_optimal_hit_rate,
    bayes_optimal_ranking,
    expected_hit_rate,
    query_truth,
)

# Upper 1e-4 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(1 - 1e-4, df)).
CHI2_1E4 = {9: 33.72, 79: 134.49}


def _small_data(**options) -> InteractionDataModule:
    source = KnownTruthSource(**{"num_users": 600, "num_items": 120, "num_clusters": 8, "mean_sequence_length": 8, "seed": 3, **options})
    return InteractionDataModule(source, max_seq_len=16)


def _prefix_histories(data):
    """Every position of every user as a query: (users, CSR offsets of the prefixes, items, targets)."""
    lengths = np.bincount(data.user_ids)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    users = data.user_ids
    prefix_lengths = data.positions
    offsets = np.concatenate([[0], np.cumsum(prefix_lengths)])
    items = np.concatenate([data.item_ids[s : s + p] for s, p in zip(starts[users], prefix_lengths)])
    return users, offsets, items, data.item_ids


def _pearson(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_determinism():
    a, b, c = (KnownTruthSource(num_users=200, num_items=100, num_clusters=5, seed=s).generated for s in (1, 1, 2))
    for name in ("user_ids", "item_ids", "positions"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    for name in ("item_cluster", "item_popularity", "user_interests", "user_weights"):
        assert np.array_equal(getattr(a.world, name), getattr(b.world, name))
    assert not np.array_equal(a.world.user_weights, c.world.user_weights)


def test_log_follows_the_process():
    data = KnownTruthSource(num_users=500, num_items=200, num_clusters=10, seed=0).generated
    world = data.world
    assert np.all(np.diff(data.user_ids) >= 0) and data.item_ids.min() >= 0
    keys = data.user_ids * 200 + data.item_ids
    assert np.unique(keys).size == keys.size  # no repeats: consumed items have probability 0
    in_interests = (world.user_interests[data.user_ids] == world.item_cluster[data.item_ids][:, None]).any(axis=1)
    assert in_interests.all()
    assert np.allclose(np.bincount(world.item_cluster, weights=world.item_popularity), 1.0)
    assert np.allclose(world.user_weights.sum(axis=1), 1.0)
    assert np.bincount(data.user_ids).min() >= 5


@pytest.mark.parametrize("stage", ["val", "test"])
def test_query_truth_is_a_distribution_over_allowed_items(stage):
    data = _small_data(stay_probability=0.3)
    truth = query_truth(data, stage)
    store, queries = data.store, (data.split.val if stage == "val" else data.split.test)
    assert truth.probabilities.shape == (len(queries), data.num_items + 1)
    assert np.allclose(truth.probabilities.sum(axis=1), 1.0)
    assert (truth.probabilities >= 0).all() and (truth.probabilities[:, 0] == 0).all()
    for q in range(0, len(queries), 37):  # the history gets 0, the target (drawn by the process) more
        history = store.items[store.offsets[queries.users[q]] : queries.history_end[q]]
        assert (truth.probabilities[q, history] == 0).all()
        assert truth.probabilities[q, truth.targets[q]] > 0
        assert truth.targets[q] == store.items[queries.history_end[q]]


def test_matches_a_direct_reading_of_the_process():
    data = KnownTruthSource(num_users=40, num_items=60, num_clusters=6, stay_probability=0.4, seed=5).generated
    world = data.world
    users, offsets, items, _ = _prefix_histories(data)
    fast = world.next_item_probabilities(users, offsets, items)
    for q in range(len(users)):
        u, history = users[q], list(items[offsets[q] : offsets[q + 1]])
        clusters = list(world.user_interests[u])
        weights = world.user_weights[u].copy()
        if history:
            last = clusters.index(world.item_cluster[history[-1]])
            weights = (1 - world.stay_probability) * weights + world.stay_probability * np.eye(len(clusters))[last]
        mass = np.zeros(world.num_items)
        for item in range(world.num_items):
            if world.item_cluster[item] in clusters and item not in history:
                mass[item] = weights[clusters.index(world.item_cluster[item])] * world.item_popularity[item]
        np.testing.assert_allclose(fast[q], mass / mass.sum(), rtol=1e-12, atol=1e-15)


def test_first_items_are_drawn_from_the_claimed_distribution():
    """First items counted by (item, whether it lies in the user's heaviest interest): observed against the
    truth's expected counts. The second key makes the check see the per-user weights, which the item
    counts alone average away."""
    # Small concentration: the weights are far from equal, so a sampler that ignored them would fail here.
    options = dict(num_users=20_000, num_items=40, num_clusters=4, interests_per_user=2, interest_concentration=0.5,
                   mean_sequence_length=3, min_sequence_length=3, seed=11)
    data = KnownTruthSource(**options).generated
    world = data.world
    users = np.arange(options["num_users"])
    heaviest = world.user_interests[users, world.user_weights.argmax(axis=1)]  # (U,) cluster
    in_heaviest = world.item_cluster[None, :] == heaviest[:, None]  # (U, N)
    no_history = np.zeros(len(users) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)

    def expected_cells(world):
        probabilities = world.next_item_probabilities(users, *no_history)  # (U, N)
        return np.stack([(probabilities * ~in_heaviest).sum(axis=0), (probabilities * in_heaviest).sum(axis=0)], axis=1).ravel()

    first = data.item_ids[data.positions == 0]
    observed = np.bincount(first * 2 + in_heaviest[users, first], minlength=80)
    assert _pearson(observed, expected_cells(world)) < CHI2_1E4[79]
    # The check has power: the same counts against equal interest weights are far out.
    assert _pearson(observed, expected_cells(dataclasses.replace(world, user_weights=np.full_like(world.user_weights, 0.5)))) > 10 * CHI2_1E4[79]


def test_every_position_is_drawn_from_the_claimed_distribution():
    """Every drawn item counted by (its rank under its true distribution, in buckets; whether it continues
    the interest of the item before): observed against expected counts."""
    data = KnownTruthSource(num_users=3000, num_items=60, num_clusters=4, interests_per_user=2, stay_probability=0.5,
                            mean_sequence_length=6, min_sequence_length=3, seed=12).generated
    users, offsets, items, targets = _prefix_histories(data)
    cluster = data.world.item_cluster
    edges = np.array([0, 1, 3, 6, 11, 60])  # rank buckets [0,1), [1,3), [3,6), [6,11), [11, 60)
    previous_cluster = np.where(data.positions > 0, cluster[np.roll(data.item_ids, 1)], -1)  # (Q,)
    continues = cluster[None, :] == previous_cluster[:, None]  # (Q, N): item i would continue the interest

    def cell_counts(world):
        probabilities = world.next_item_probabilities(users, offsets, items)
        order = np.argsort(-probabilities, axis=1, kind="stable")
        rank = np.argmax(order == targets[:, None], axis=1)
        bucket = np.searchsorted(edges, rank, side="right") - 1
        observed = np.bincount(bucket * 2 + continues[np.arange(len(targets)), targets], minlength=10)
        bucket_of_rank = np.searchsorted(edges, np.arange(60), side="right") - 1
        sorted_mass = np.take_along_axis(probabilities, order, axis=1)
        sorted_continues = np.take_along_axis(continues, order, axis=1)
        expected = np.zeros(10)
        for b in range(5):
            in_bucket = bucket_of_rank == b
            expected[2 * b] = (sorted_mass[:, in_bucket] * ~sorted_continues[:, in_bucket]).sum()
            expected[2 * b + 1] = (sorted_mass[:, in_bucket] * sorted_continues[:, in_bucket]).sum()
        return observed, expected

    assert _pearson(*cell_counts(data.world)) < CHI2_1E4[9]
    # Power: a truth that forgot the stay probability is far out.
    assert _pearson(*cell_counts(dataclasses.replace(data.world, stay_probability=0.0))) > 10 * CHI2_1E4[9]


def test_bayes_optimal_beats_other_rankings_and_matches_the_realised_rate():
    data = _small_data(num_users=3000, seed=4)
    truth = query_truth(data, "test")
    k = 10
    best = bayes_optimal_hit_rate(truth.probabilities, k)
    # Popularity over what the model sees at test time, history excluded.
    counts = data.visible_item_counts("test").astype(float)
    store, queries = data.store, data.split.test
    scores = np.tile(counts, (len(queries), 1))
    scores[:, 0] = -np.inf
    for q in range(len(queries)):
        scores[q, store.items[store.offsets[queries.users[q]] : queries.history_end[q]]] = -np.inf
    popularity = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rng = np.random.default_rng(0)
    random = np.stack([rng.choice(np.arange(1, data.num_items + 1), k, replace=False) for _ in range(len(queries))])
    for ranking in (popularity, random, bayes_optimal_ranking(truth.probabilities, 2 * k)[:, k:]):
        assert expected_hit_rate(truth.probabilities, ranking) <= best
    assert expected_hit_rate(truth.probabilities, popularity) < best - 0.1
    # The realised hit rate of the Bayes ranking is its expectation up to sampling noise (4 sd).
    top_mass = np.sort(truth.probabilities, axis=1)[:, -k:].sum(axis=1)
    realised = np.mean((bayes_optimal_ranking(truth.probabilities, k) == truth.targets[:, None]).any(axis=1))
    noise = np.sqrt((top_mass * (1 - top_mass)).sum()) / len(queries)
    assert abs(realised - best) < 4 * noise
    assert bayes_optimal_hit_rate(truth.probabilities, data.num_items) == pytest.approx(1.0)


def test_the_interests_switch():
    mixture, single = (_small_data(num_users=1000, interests_per_user=k) for k in (3, 1))
    clusters = {}
    for name, data in (("mixture", mixture), ("single", single)):
        truth = query_truth(data, "test")
        world, store = data.source.world, data.store
        top10 = bayes_optimal_ranking(truth.probabilities, 10)
        possible = np.take_along_axis(truth.probabilities, top10, axis=1) > 0  # a short cluster leaves zeros
        raw_top10 = store.item_raw_ids[top10]
        clusters[name] = np.array([len(set(world.item_cluster[row[keep]])) for row, keep in zip(raw_top10, possible)])
        support = store.item_raw_ids[np.nonzero(truth.probabilities)[1]]
        rows = np.nonzero(truth.probabilities)[0]
        assert len(np.unique(rows * 100 + world.item_cluster[support])) == len(truth.targets) * (1 if name == "single" else 3)
    # A single interest: the best top 10 lies in one cluster; a mixture: nearly always in several.
    assert (clusters["single"] == 1).all()
    assert np.mean(clusters["mixture"] >= 2) > 0.9


def test_query_truth_refuses_other_sources():
    from rails_lightning.data import SyntheticSource

    with pytest.raises(TypeError, match="KnownTruthSource"):
        query_truth(InteractionDataModule(SyntheticSource(num_users=50, num_items=100, num_clusters=5)), "test")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_users=0), "num_users"),
        (dict(num_items=10, num_clusters=20), "num_items"),
        (dict(interests_per_user=50), "interests_per_user"),
        (dict(mean_sequence_length=3), "mean_sequence_length"),
        (dict(num_items=40, num_clusters=40, interests_per_user=1), "too small"),
        (dict(stay_probability=1.5), "stay_probability"),
        (dict(interest_concentration=0.0), "interest_concentration"),
        (dict(num_users=True), "integer"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        KnownTruthSource(**options).generated
