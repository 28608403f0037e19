import numpy as np
import pytest

from rails_lightning.data.synthetic import MAX_REPEAT_RATE, SyntheticInteractions, SyntheticSource


@pytest.fixture(scope="module")
def default_data() -> SyntheticInteractions:
    return SyntheticSource().generate()


def _sequences(data: SyntheticInteractions, num_users: int):
    lengths = np.bincount(data.user_ids, minlength=num_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return lengths, offsets


def _repeat_count(data: SyntheticInteractions, num_items: int) -> int:
    keys = data.user_ids * num_items + data.item_ids
    return int(keys.size - np.unique(keys).size)


def test_determinism():
    kwargs = dict(num_users=500, num_items=800, num_clusters=20)
    a = SyntheticSource(seed=3, **kwargs).generate()
    b = SyntheticSource(seed=3, **kwargs).generate()
    c = SyntheticSource(seed=4, **kwargs).generate()
    for name in ("user_ids", "item_ids", "positions", "item_cluster"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name
    different = a.item_ids.shape != c.item_ids.shape or not np.array_equal(a.item_ids, c.item_ids)
    assert different
    assert not np.array_equal(a.item_cluster, c.item_cluster)


def test_shapes_dtypes_ranges(default_data):
    d = default_data
    num_users, num_items, num_clusters = 3000, 2000, 40
    m = d.user_ids.shape[0]
    assert d.num_interactions == m
    for arr in (d.user_ids, d.item_ids, d.positions):
        assert arr.shape == (m,) and arr.dtype == np.int64
    assert d.item_cluster.shape == (num_items,) and d.item_cluster.dtype == np.int64
    assert d.user_ids.min() == 0 and d.user_ids.max() == num_users - 1
    assert d.item_ids.min() >= 0 and d.item_ids.max() < num_items
    assert d.item_cluster.min() == 0 and d.item_cluster.max() == num_clusters - 1
    # every cluster non-empty and balanced-ish
    sizes = np.bincount(d.item_cluster, minlength=num_clusters)
    assert sizes.min() >= (num_items // num_clusters) // 2
    assert sizes.max() <= 3 * num_items // num_clusters


def test_sequences_sorted_lengths_positions(default_data):
    d = default_data
    num_users = 3000
    assert np.all(np.diff(d.user_ids) >= 0)
    lengths, offsets = _sequences(d, num_users)
    assert lengths.min() >= 5
    # mean length close to the requested 30 (lengths are capped, so a bit lower)
    assert 24 <= lengths.mean() <= 31
    expected_positions = np.arange(d.user_ids.size) - np.repeat(offsets[:-1], lengths)
    np.testing.assert_array_equal(d.positions, expected_positions)


def test_no_repeats(default_data):
    assert _repeat_count(default_data, 2000) == 0
    # a tighter configuration (small clusters, long sequences) stays below the documented bound
    d = SyntheticSource(num_users=1000, num_items=400, num_clusters=20,
                        mean_sequence_length=25, min_sequence_length=10, seed=1).generate()
    assert _repeat_count(d, 400) <= MAX_REPEAT_RATE * d.num_interactions


def test_users_stay_within_their_interests(default_data):
    d = default_data
    clusters = d.item_cluster[d.item_ids]
    pairs = np.unique(d.user_ids * 1000 + clusters)
    clusters_per_user = np.bincount(pairs // 1000, minlength=3000)
    assert clusters_per_user.max() <= 3
    # most users actually use several interests (a mixture, not a single topic)
    assert np.mean(clusters_per_user >= 2) > 0.8


@pytest.mark.parametrize("stay", [0.3, 0.7, 0.95])
def test_consecutive_same_cluster_fraction(stay):
    d = SyntheticSource(num_users=1500, stay_probability=stay, seed=2).generate()
    same_user = d.user_ids[1:] == d.user_ids[:-1]
    clusters = d.item_cluster[d.item_ids]
    same = (clusters[1:] == clusters[:-1])[same_user].mean()
    assert same >= stay - 0.05
    assert same <= stay + 0.05


def test_sequential_locality(default_data):
    # A large share of within-cluster transitions are short forward steps along the ring,
    # which is what a sequence model can exploit: measure how concentrated successors are.
    d = default_data
    same_user = d.user_ids[1:] == d.user_ids[:-1]
    a, b = d.item_ids[:-1][same_user], d.item_ids[1:][same_user]
    pair_counts = np.unique(a * 2000 + b, return_counts=True)[1]
    # repeated exact transitions are far above what independent draws would give
    assert pair_counts.max() >= 10
    assert (pair_counts[pair_counts >= 3].sum() / a.size) > 0.2


def test_popularity_skewed_but_weak(default_data):
    d = default_data
    num_users, num_items = 3000, 2000
    counts = np.sort(np.bincount(d.item_ids, minlength=num_items))[::-1]
    assert counts[: num_items // 10].sum() > 0.25 * counts.sum()

    # Leave-one-out popularity baseline, excluding the user's history: HR@10 is small.
    lengths, offsets = _sequences(d, num_users)
    last_idx = offsets[1:] - 1
    train = np.ones(d.user_ids.size, dtype=bool)
    train[last_idx] = False
    train_counts = np.bincount(d.item_ids[train], minlength=num_items)
    order = np.argsort(-train_counts, kind="stable")
    rank_of = np.empty(num_items, dtype=np.int64)
    rank_of[order] = np.arange(num_items)
    target_rank = rank_of[d.item_ids[last_idx]]
    # number of history items ranked above the target
    hist_rank = rank_of[d.item_ids[train]]
    above = np.bincount(d.user_ids[train], weights=hist_rank < target_rank[d.user_ids[train]],
                        minlength=num_users)
    hr10 = np.mean(target_rank - above < 10)
    assert hr10 < 0.05


def test_edge_configurations():
    d = SyntheticSource(num_users=200, num_items=200, num_clusters=10,
                        interests_per_user=10, seed=5).generate()  # all clusters (Gumbel path)
    assert d.item_cluster.max() == 9
    d = SyntheticSource(num_users=200, num_items=500, num_clusters=10,
                        interests_per_user=1, stay_probability=0.0, seed=6).generate()
    clusters = d.item_cluster[d.item_ids]
    per_user = np.unique(d.user_ids * 100 + clusters) // 100
    assert np.bincount(per_user).max() == 1
    d = SyntheticSource(num_users=100, num_items=300, num_clusters=5,
                        mean_sequence_length=5, min_sequence_length=5, seed=7).generate()
    assert np.all(np.bincount(d.user_ids) == 5)


def test_large_size_runs():
    d = SyntheticSource(num_users=20_000, num_items=200_000, num_clusters=400, seed=0).generate()
    assert d.item_cluster.shape == (200_000,)
    assert np.bincount(d.user_ids).min() >= 5
    assert d.item_ids.max() < 200_000


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_users=0),
        dict(num_items=-1),
        dict(num_clusters=0),
        dict(interests_per_user=0),
        dict(mean_sequence_length=0),
        dict(min_sequence_length=0),
        dict(num_items=30, num_clusters=40),
        dict(interests_per_user=41, num_clusters=40),
        dict(mean_sequence_length=4, min_sequence_length=5),
        dict(stay_probability=1.5),
        dict(stay_probability=-0.1),
        dict(local_probability=2.0),
        dict(popularity_exponent=-1.0),
        dict(num_users=2.5),
        dict(num_items=40, num_clusters=40, interests_per_user=1),  # clusters too small
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticSource(**kwargs).generate()


def test_include_unseen_items_puts_the_whole_catalogue_in_the_corpus():
    from rails_lightning.data import InteractionDataModule

    options = dict(num_users=50, num_items=5000, num_clusters=10, mean_sequence_length=10)
    seen = InteractionDataModule(SyntheticSource(**options))
    every = InteractionDataModule(SyntheticSource(**options, include_unseen_items=True))
    assert seen.num_items < 5000 and every.num_items == 5000
    assert every.store.num_interactions == seen.store.num_interactions
    # The same sequences, in raw ids: only the id mapping grew.
    np.testing.assert_array_equal(every.store.item_raw_ids[every.store.items], seen.store.item_raw_ids[seen.store.items])
    assert every.item_titles[1].startswith("item 0 (cluster ") and len(every.item_clusters) == 5001
