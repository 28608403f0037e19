"""The data layer: sequence store and splits, sources (synthetic, MovieLens, any log), the DataModule.

Real files in ``tmp_path`` and real ``datasets`` loading; no mocks. The shared MovieLens
copies in ``<repo>/../shared/data`` are used when present (skipped otherwise).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rails_lightning.data import (
    DataError,
    InteractionDataModule,
    InteractionLogSource,
    MovieLensSource,
    QueryBatch,
    SyntheticSource,
    TrainBatch,
)
from rails_lightning.data.sequences import (
    PADDING_ID,
    InteractionLog,
    build_sequences,
    gather_ranges,
    last_window,
    leave_one_out_split,
    temporal_split,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# ============================================================================ sequences

# (user, item, order) in file order. User 30 has one event and is dropped with
# min_interactions=2 (and item 900, seen only by them, disappears). User 10 has a tie in
# `order` (items 700 then 500 at order 3): the file order must be kept.
_TINY_LOG = [
    (10, 700, 3),
    (20, 700, 1),
    (10, 300, 1),
    (30, 900, 1),
    (10, 500, 3),
    (20, 300, 2),
    (10, 100, 2),
    (20, 500, 0),
]


def _tiny_log(timestamps: bool = True) -> InteractionLog:
    users, items, order = (_array(c) for c in zip(*_TINY_LOG))
    return InteractionLog(
        user_ids=users, item_ids=items, order=order, name="tiny", timestamps=order * 10 if timestamps else None
    )


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_build_sequences_remaps_sorts_and_drops():
    store = build_sequences(_tiny_log(), min_interactions=2)
    # Kept users 10, 20 -> 0, 1; items of kept rows 100, 300, 500, 700 -> 1..4 (0 is padding).
    np.testing.assert_array_equal(store.user_raw_ids, [10, 20])
    np.testing.assert_array_equal(store.item_raw_ids, [-1, 100, 300, 500, 700])
    np.testing.assert_array_equal(store.offsets, [0, 4, 7])
    # user 10: 300 (1), 100 (2), 700 (3, earlier row), 500 (3); user 20: 500 (0), 700 (1), 300 (2)
    np.testing.assert_array_equal(store.items, [2, 1, 4, 3, 3, 4, 2])
    np.testing.assert_array_equal(store.timestamps, [10, 20, 30, 30, 0, 10, 20])
    assert store.items.dtype == np.int64 and store.offsets.dtype == np.int64
    assert (store.num_users, store.num_items, store.num_interactions) == (2, 4, 7)
    assert store.num_dropped_users == 1
    np.testing.assert_array_equal(store.lengths, [4, 3])
    # The mapping recovers the raw ids.
    np.testing.assert_array_equal(store.item_raw_ids[store.items[:4]], [300, 100, 700, 500])
    assert PADDING_ID == 0 and store.items.min() >= 1


def test_build_sequences_keeps_everyone_with_min_one():
    store = build_sequences(_tiny_log(timestamps=False), min_interactions=1)
    assert store.num_dropped_users == 0 and store.timestamps is None
    np.testing.assert_array_equal(store.user_raw_ids, [10, 20, 30])
    np.testing.assert_array_equal(store.item_raw_ids, [-1, 100, 300, 500, 700, 900])
    np.testing.assert_array_equal(store.items, [2, 1, 4, 3, 3, 4, 2, 5])


def test_build_sequences_ties_keep_file_order_at_scale():
    rng = np.random.default_rng(0)
    n = 20_000
    users = rng.integers(0, 50, n)
    order = rng.integers(0, 4, n)  # many ties
    items = np.arange(n)  # item raw id == file row, so the file order is visible
    store = build_sequences(InteractionLog(users, items, order, name="ties"), min_interactions=1)
    raw = store.item_raw_ids[store.items]
    for u in range(store.num_users):
        seq = raw[store.offsets[u]:store.offsets[u + 1]]
        expected = sorted(np.flatnonzero(users == store.user_raw_ids[u]), key=lambda row: (order[row], row))
        np.testing.assert_array_equal(seq, expected)


def test_build_sequences_errors():
    with pytest.raises(DataError, match="tiny: no interactions"):
        build_sequences(InteractionLog(_array([]), _array([]), _array([]), name="tiny"), min_interactions=1)
    with pytest.raises(DataError, match=r"no user has at least 5 interactions \(largest: 4\)"):
        build_sequences(_tiny_log(), min_interactions=5)


def test_leave_one_out_split_exact():
    store = build_sequences(_tiny_log(), min_interactions=2)  # items [2, 1, 4, 3 | 3, 4, 2]
    split = leave_one_out_split(store)
    np.testing.assert_array_equal(split.train_end, [2, 5])
    np.testing.assert_array_equal(split.val.users, [0, 1])
    np.testing.assert_array_equal(split.val.history_end, [2, 5])
    np.testing.assert_array_equal(split.val.target_end, [3, 6])
    np.testing.assert_array_equal(split.test.history_end, [3, 6])
    np.testing.assert_array_equal(split.test.target_end, [4, 7])
    # val target = second-to-last item, test target = last item
    np.testing.assert_array_equal(store.items[split.val.history_end], [4, 4])
    np.testing.assert_array_equal(store.items[split.test.history_end], [3, 2])
    assert len(split.val) == len(split.test) == 2 and split.val.max_targets == split.test.max_targets == 1


def test_leave_one_out_needs_three_items():
    log = InteractionLog(_array([1, 1, 2, 2, 2]), _array([1, 2, 1, 2, 3]), _array([0, 1, 0, 1, 2]), name="short")
    with pytest.raises(DataError, match="at least 3 interactions"):
        leave_one_out_split(build_sequences(log, min_interactions=2))


def _temporal_store():
    # Ten events at t = 0..9 (item raw id 100 + t, so item id t + 1). With val/test fractions
    # 0.2 the cuts are the 0.6 / 0.8 quantiles of 0..9: 5.4 and 7.2.
    #   user 1: t 0 3 | 6 | 8 9   (history, one val target, two test targets)
    #   user 2: t 1 2 4 5         (all training: no query)
    #   user 3: t 7               (one event in the val period: no history, no query)
    events = [(1, 0), (2, 1), (2, 2), (1, 3), (2, 4), (2, 5), (1, 6), (3, 7), (1, 8), (1, 9)]
    users, ts = (_array(c) for c in zip(*events))
    return build_sequences(InteractionLog(users, 100 + ts, ts, name="clock", timestamps=ts), min_interactions=1)


def test_temporal_split_exact():
    store = _temporal_store()
    np.testing.assert_array_equal(store.offsets, [0, 5, 9, 10])
    np.testing.assert_array_equal(store.items, [1, 4, 7, 9, 10, 2, 3, 5, 6, 8])
    split = temporal_split(store, val_fraction=0.2, test_fraction=0.2)
    np.testing.assert_array_equal(split.train_end, [2, 9, 9])
    np.testing.assert_array_equal(split.val.users, [0])
    np.testing.assert_array_equal(split.val.history_end, [2])
    np.testing.assert_array_equal(split.val.target_end, [3])
    np.testing.assert_array_equal(split.test.users, [0])
    np.testing.assert_array_equal(split.test.history_end, [3])
    np.testing.assert_array_equal(split.test.target_end, [5])
    assert split.test.max_targets == 2
    np.testing.assert_array_equal(store.items[3:5], [9, 10])  # the two test targets


def test_temporal_split_needs_timestamps():
    store = build_sequences(_tiny_log(timestamps=False), min_interactions=2)
    with pytest.raises(DataError, match="needs timestamps"):
        temporal_split(store)


def test_gather_ranges():
    values = np.arange(10, dtype=np.int64) * 10
    offsets, flat = gather_ranges(values, _array([1, 5, 7, 4]), _array([3, 5, 10, 2]))
    np.testing.assert_array_equal(offsets, [0, 2, 2, 5, 5])  # empty and reversed ranges give nothing
    np.testing.assert_array_equal(flat, [10, 20, 70, 80, 90])
    offsets, flat = gather_ranges(values, _array([]), _array([]))
    np.testing.assert_array_equal(offsets, [0])
    assert flat.shape == (0,)


def test_last_window():
    values = _array([11, 12, 13, 14, 15, 16])
    starts, ends = _array([0, 2, 4]), _array([3, 6, 4])
    np.testing.assert_array_equal(
        last_window(values, starts, ends, 4), [[0, 11, 12, 13], [13, 14, 15, 16], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(last_window(values, starts, ends, 2), [[12, 13], [15, 16], [0, 0]])
    assert last_window(values, starts, ends, 4).dtype == np.int64


# ============================================================================ DataModule on synthetic data

_MAX_LEN = 8
_SYNTH = dict(num_users=120, num_items=200, num_clusters=8, mean_sequence_length=12, seed=3)


def _synthetic_dm(**kwargs) -> InteractionDataModule:
    kwargs = {"max_seq_len": _MAX_LEN, "batch_size": 32, "eval_batch_size": 50, **kwargs}
    return InteractionDataModule(SyntheticSource(**_SYNTH), **kwargs)


@pytest.fixture(scope="module")
def synth_dm() -> InteractionDataModule:
    dm = _synthetic_dm()
    dm.setup("fit")
    return dm


def _reference_train_row(seq: list[int], length: int) -> tuple[list[int], list[int]]:
    """Independent reference: left-padded last length + 1 items, inputs and next-item targets."""
    window = seq[-(length + 1):]
    window = [0] * (length + 1 - len(window)) + window
    inputs = window[:-1]
    targets = [t if i else 0 for i, t in zip(inputs, window[1:])]
    return inputs, targets


def _left_padded(seq, length: int) -> list[int]:
    seq = list(seq)[-length:]
    return [0] * (length - len(seq)) + seq


def test_synthetic_store_matches_the_generator(synth_dm):
    dm = synth_dm
    raw = SyntheticSource(**_SYNTH).generate()
    store = dm.store
    assert dm.num_users == 120 and store.num_dropped_users == 0  # synthetic sequences have >= 5 items
    assert dm.num_items == len(np.unique(raw.item_ids)) and dm.num_items <= 200
    # Same events in the same order: the generator's log is sorted by user then position.
    np.testing.assert_array_equal(np.repeat(store.user_raw_ids, store.lengths), raw.user_ids)
    np.testing.assert_array_equal(store.item_raw_ids[store.items], raw.item_ids)
    lengths = store.lengths
    assert lengths.min() < _MAX_LEN + 1 < lengths.max() - 2  # both padded and truncated windows below


def test_train_batches(synth_dm):
    dm, store = synth_dm, synth_dm.store
    train_end = dm.split.train_end
    loader = dm.train_dataloader()
    seen = []
    for batch in loader:
        assert isinstance(batch, TrainBatch)
        b = batch.user_ids.shape[0]
        assert 1 <= b <= 32
        assert batch.input_ids.shape == batch.target_ids.shape == (b, _MAX_LEN)
        assert batch.user_ids.dtype == batch.input_ids.dtype == batch.target_ids.dtype == torch.int64
        assert batch.input_ids.is_contiguous() and batch.target_ids.is_contiguous()  # models may .view()
        for row, user in enumerate(batch.user_ids.tolist()):
            seq = store.items[store.offsets[user]:train_end[user]].tolist()
            inputs, targets = _reference_train_row(seq, _MAX_LEN)
            assert batch.input_ids[row].tolist() == inputs
            assert batch.target_ids[row].tolist() == targets
            # Every non-padding position's target is the next training item.
            n = min(len(seq), _MAX_LEN + 1) - 1
            assert batch.input_ids[row, _MAX_LEN - n:].tolist() == seq[len(seq) - n - 1:-1]
            assert batch.target_ids[row, _MAX_LEN - n:].tolist() == seq[len(seq) - n:]
            assert (batch.input_ids[row, :_MAX_LEN - n] == 0).all()  # left padding
            assert (batch.target_ids[row, :_MAX_LEN - n] == 0).all()
        seen += batch.user_ids.tolist()
    # Every user with at least two training items, exactly once per epoch.
    assert sorted(seen) == np.flatnonzero(train_end - store.offsets[:-1] >= 2).tolist()


def test_padded_and_truncated_windows(synth_dm):
    store, train_end = synth_dm.store, synth_dm.split.train_end
    batches = list(synth_dm.train_dataloader())
    rows = {u: (b, i) for b in batches for i, u in enumerate(b.user_ids.tolist())}
    train_len = train_end - store.offsets[:-1]
    short = int(np.flatnonzero(train_len == 3)[0])  # 2 inputs, 6 padding positions
    b, i = rows[short]
    seq = store.items[store.offsets[short]:train_end[short]].tolist()
    assert b.input_ids[i].tolist() == [0] * 6 + seq[:2]
    assert b.target_ids[i].tolist() == [0] * 6 + seq[1:]
    long = int(np.flatnonzero(train_len > _MAX_LEN + 1)[0])  # only the last max_seq_len + 1 items
    b, i = rows[long]
    seq = store.items[store.offsets[long]:train_end[long]].tolist()
    assert b.input_ids[i].tolist() == seq[-_MAX_LEN - 1:-1]
    assert b.target_ids[i].tolist() == seq[-_MAX_LEN:]


@pytest.mark.parametrize("stage", ["val", "test"])
def test_query_batches(synth_dm, stage):
    dm, store = synth_dm, synth_dm.store
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    batches = list(loader)
    assert [b.user_ids.shape[0] for b in batches] == [50, 50, 20]  # in order, eval_batch_size 50
    users = torch.cat([b.user_ids for b in batches]).tolist()
    assert users == list(range(dm.num_users))
    back = 2 if stage == "val" else 1  # val target: second-to-last item; test: the last
    for batch in batches:
        assert isinstance(batch, QueryBatch)
        b = batch.user_ids.shape[0]
        assert batch.input_ids.shape == (b, _MAX_LEN) and batch.targets.shape == (b, 1)
        assert batch.exclude_offsets.shape == (b + 1,) and batch.exclude_offsets[0] == 0
        assert batch.exclude_items.shape == (int(batch.exclude_offsets[-1]),)
        for tensor in (batch.user_ids, batch.input_ids, batch.targets, batch.exclude_offsets, batch.exclude_items):
            assert tensor.dtype == torch.int64 and tensor.is_contiguous()
        for row, user in enumerate(batch.user_ids.tolist()):
            seq = store.items[store.offsets[user]:store.offsets[user + 1]].tolist()
            history = seq[:-back]
            assert batch.targets[row].tolist() == [seq[-back]]
            lo, hi = batch.exclude_offsets[row].item(), batch.exclude_offsets[row + 1].item()
            assert batch.exclude_items[lo:hi].tolist() == history  # every earlier item
            assert batch.input_ids[row].tolist() == _left_padded(history, _MAX_LEN)


def test_predict_loader_is_the_test_queries(synth_dm):
    a, b = next(iter(synth_dm.test_dataloader())), next(iter(synth_dm.predict_dataloader()))
    assert torch.equal(a.targets, b.targets) and torch.equal(a.input_ids, b.input_ids)


def test_counts_summary_and_metadata(synth_dm):
    dm, store = synth_dm, synth_dm.store
    counts = dm.train_item_counts
    assert counts.shape == (dm.num_items + 1,) and counts[0] == 0
    train_size = int((dm.split.train_end - store.offsets[:-1]).sum())
    assert counts.sum() == train_size == store.num_interactions - 2 * dm.num_users
    np.testing.assert_array_equal(
        counts, np.bincount(np.concatenate([store.items[s:e] for s, e in zip(store.offsets[:-1], dm.split.train_end)]),
                            minlength=dm.num_items + 1)
    )
    summary = dm.summary()
    assert summary["dataset"] == SyntheticSource(**_SYNTH).description
    assert summary["users"] == 120 and summary["items"] == dm.num_items
    assert summary["interactions"] == store.num_interactions
    assert summary["dropped_users"] == 0
    assert summary["mean_sequence_length"] == pytest.approx(store.num_interactions / 120)
    assert summary["val_queries"] == summary["test_queries"] == 120
    # Titles / clusters per contiguous item id; synthetic items have no genres.
    raw = SyntheticSource(**_SYNTH).generate()
    assert len(dm.item_titles) == dm.num_items + 1 and dm.item_titles[0] == "<pad>"
    r = int(store.item_raw_ids[1])
    assert dm.item_titles[1] == f"item {r} (cluster {raw.item_cluster[r]})"
    np.testing.assert_array_equal(dm.item_clusters[1:], raw.item_cluster[store.item_raw_ids[1:]])
    assert dm.item_features is None and dm.num_item_features == 0


def test_no_item_features_even_when_asked_for_synthetic():
    dm = _synthetic_dm(use_item_features=True)
    assert dm.item_features is None and dm.num_item_features == 0


def test_deterministic_across_instances(synth_dm):
    other = _synthetic_dm()
    for name in ("offsets", "items", "user_raw_ids", "item_raw_ids"):
        np.testing.assert_array_equal(getattr(other.store, name), getattr(synth_dm.store, name))
    np.testing.assert_array_equal(other.split.train_end, synth_dm.split.train_end)
    a, b = next(iter(other.val_dataloader())), next(iter(synth_dm.val_dataloader()))
    for name in ("user_ids", "input_ids", "targets", "exclude_offsets", "exclude_items"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.manual_seed(7)
    a = next(iter(other.train_dataloader()))
    torch.manual_seed(7)
    b = next(iter(synth_dm.train_dataloader()))
    assert torch.equal(a.user_ids, b.user_ids) and torch.equal(a.input_ids, b.input_ids)
    different = InteractionDataModule(SyntheticSource(**{**_SYNTH, "seed": 4}), max_seq_len=_MAX_LEN)
    assert not np.array_equal(different.store.items, synth_dm.store.items)


def test_worker_processes_give_the_same_batches(synth_dm):
    dm = _synthetic_dm(num_workers=1)
    a, b = next(iter(dm.val_dataloader())), next(iter(synth_dm.val_dataloader()))
    assert isinstance(a, QueryBatch)
    for name in ("user_ids", "input_ids", "targets", "exclude_offsets", "exclude_items"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert isinstance(next(iter(dm.train_dataloader())), TrainBatch)


def test_temporal_split_on_synthetic_data_fails_clearly():
    with pytest.raises(DataError, match="timestamps"):
        _synthetic_dm(split="temporal").setup("fit")


def test_min_interactions_drops_users(caplog):
    dm = _synthetic_dm(min_interactions=10)
    raw_lengths = np.bincount(SyntheticSource(**_SYNTH).generate().user_ids)
    with caplog.at_level("INFO", logger="rails_lightning.data.datamodule"):
        assert dm.num_users == int((raw_lengths >= 10).sum()) < 120
    dropped = int((raw_lengths < 10).sum())
    assert f"({dropped} users with < 10 interactions dropped)" in caplog.text  # the count is logged
    assert dm.store.num_dropped_users == int((raw_lengths < 10).sum())
    assert dm.summary()["dropped_users"] == dm.store.num_dropped_users
    assert dm.store.lengths.min() >= 10


def test_default_source_is_synthetic():
    assert isinstance(InteractionDataModule().source, SyntheticSource)


# ============================================================================ MovieLens: fake GroupLens files

_GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
# (user, movie, rating, timestamp), deliberately not in time order.
_RATINGS = [
    (1, 10, 5, 300), (1, 20, 3, 100), (1, 30, 4, 200), (1, 40, 1, 400),
    (2, 20, 4, 150), (2, 10, 2, 50), (2, 30, 5, 250),
    (3, 40, 4, 10), (3, 10, 4, 30), (3, 20, 5, 20),
]
_TITLES = {10: "Café Society (1995)", 20: "Heat (1995)", 30: "Toy Story (1995)", 40: "Se7en (1995)"}
_MOVIE_GENRES = {10: ["Drama"], 20: ["Action", "Crime", "Thriller"], 30: ["Animation", "Children's", "Comedy"],
                 40: ["Thriller"]}
# Expected per-user time order of movies.
_ORDER = {1: [20, 30, 10, 40], 2: [10, 20, 30], 3: [40, 20, 10]}


def _write_ml100k(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in _RATINGS))
    lines = []
    for movie, title in _TITLES.items():
        flags = ["1" if g in _MOVIE_GENRES[movie] else "0" for g in _GENRES_100K]
        lines.append("|".join([str(movie), title, "01-Jan-1995", "", "http://example/x", *flags]))
    (directory / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return directory


def _write_ml1m(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in _RATINGS))
    movies = "".join(f"{m}::{t}::{'|'.join(_MOVIE_GENRES[m])}\n" for m, t in _TITLES.items())
    (directory / "movies.dat").write_bytes(movies.encode("latin-1"))
    return directory


def _write_ml20m(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{u},{m},{r - 0.5 if r == 5 else r:.1f},{t}\n" for u, m, r, t in _RATINGS)
    (directory / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + rows)
    movies = "movieId,title,genres\n" + "".join(
        f'{m},"{t}",{"|".join(_MOVIE_GENRES[m])}\n' for m, t in _TITLES.items()
    ) + '50,"Bird, The (2000)",(no genres listed)\n'
    (directory / "movies.csv").write_bytes(movies.encode("utf-8"))
    return directory


_WRITERS = {"ml-100k": _write_ml100k, "ml-1m": _write_ml1m, "ml-20m": _write_ml20m}


def _raw_sequences(store) -> dict[int, list[int]]:
    raw_items = store.item_raw_ids[store.items]
    return {
        int(store.user_raw_ids[u]): raw_items[store.offsets[u]:store.offsets[u + 1]].tolist()
        for u in range(store.num_users)
    }


@pytest.mark.parametrize("variant", ["ml-100k", "ml-1m", "ml-20m"])
def test_movielens_fake_files(tmp_path, variant):
    data_dir = _WRITERS[variant](tmp_path / "files")
    # The files are there, so nothing is downloaded (the mirror would fail).
    source = MovieLensSource(
        variant=variant, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), download=True,
        mirror=(tmp_path / "no-mirror").as_uri() + "/",
    )
    dm = InteractionDataModule(source, min_interactions=3, max_seq_len=4, use_item_features=True)
    assert not (tmp_path / "cache").exists()
    assert (dm.num_users, dm.num_items, dm.store.num_interactions) == (3, 4, 10)
    assert _raw_sequences(dm.store) == _ORDER  # sorted by timestamp
    raw = dm._raw_log()
    assert raw.item_titles[10] == "Café Society (1995)"  # latin-1 (100k, 1m) / utf-8 (20m) decoded
    item_of = {int(r): i for i, r in enumerate(dm.store.item_raw_ids) if i}
    assert dm.item_titles == ["<pad>"] + [_TITLES[m] for m in (10, 20, 30, 40)]
    # Multi-hot genres over the sorted genre names; row 0 (padding) empty.
    features = dm.item_features
    assert features.shape == (5, dm.num_item_features) and features.dtype == torch.float32
    assert features[0].sum() == 0
    for movie, genres in _MOVIE_GENRES.items():
        on = {dm.genre_names[j] for j in torch.nonzero(features[item_of[movie]]).flatten().tolist()}
        assert on == set(genres)
    assert dm.genre_names == sorted({g for gs in _MOVIE_GENRES.values() for g in gs})
    if variant == "ml-20m":
        assert raw.item_titles[50] == "Bird, The (2000)" and raw.item_genres[50] == []
    # Leave-one-out: the last two items of user 1 are 10 (val) and 40 (test).
    val, test = next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))
    assert dm.store.item_raw_ids[val.targets.numpy()].tolist() == [[10], [20], [20]]
    assert dm.store.item_raw_ids[test.targets.numpy()].tolist() == [[40], [30], [10]]
    # The batches carry the rating times of the history items (what HSTU's time bias reads).
    time_of = {(u, m): t for u, m, _, t in _RATINGS}
    for row, user in enumerate(test.user_ids.tolist()):
        raw_user = int(dm.store.user_raw_ids[user])
        expected = [time_of[raw_user, int(dm.store.item_raw_ids[i])] if i else 0 for i in test.input_ids[row].tolist()]
        assert test.timestamps[row].tolist() == expected


@pytest.mark.parametrize("variant", ["ml-100k", "ml-1m", "ml-20m"])
def test_movielens_min_rating_and_no_movie_file(tmp_path, variant):
    data_dir = _WRITERS[variant](tmp_path)
    (data_dir / {"ml-100k": "u.item", "ml-1m": "movies.dat", "ml-20m": "movies.csv"}[variant]).unlink()
    log = MovieLensSource(variant=variant, data_dir=str(data_dir), download=False, min_rating=4).load()
    kept = sorted((u, m) for u, m, r, _ in _RATINGS if r >= 4)
    assert sorted(zip(log.user_ids.tolist(), log.item_ids.tolist())) == kept
    assert log.item_titles is None and log.item_genres is None
    np.testing.assert_array_equal(log.order, log.timestamps)


def test_movielens_ml1m_ordered_copy(tmp_path):
    # The shared ML-1M layout: order from seq_pos, timestamps partly missing.
    rows = ["user_id,movie_id,rating,timestamp,seq_pos,time_split"]
    rows += ["1,30,4,,1,train", "1,10,5,900,2,test", "1,20,3,,0,train", "2,10,4,500,1,val", "2,20,2,,0,train",
             "2,30,4,950,2,test", "1,40,4,950,3,test",
             "3,50,2,,0,train", "3,20,4,700,1,train", "3,30,1,,2,train", "3,10,4,800,3,train", "3,40,3,,4,train"]
    (tmp_path / "ratings_ordered.csv.gz").write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    _write_ml1m(tmp_path / "m")
    (tmp_path / "m" / "movies.dat").rename(tmp_path / "movies.dat")
    log = MovieLensSource(variant="ml-1m", data_dir=str(tmp_path), download=False).load()
    assert log.name.endswith("ratings_ordered.csv.gz")
    store = build_sequences(log, min_interactions=1)
    assert _raw_sequences(store) == {1: [20, 30, 10, 40], 2: [20, 10, 30], 3: [50, 20, 30, 10, 40]}
    # A missing time takes the user's previous known one; before the first known one, that one if it is a
    # training rating's (user 3), else the earliest known time of the log (users 1 and 2: val / test first).
    np.testing.assert_array_equal(store.timestamps, [500, 500, 900, 950, 500, 500, 950, 700, 700, 700, 800, 800])
    assert log.item_titles[20] == "Heat (1995)"


def test_movielens_bad_rating_file(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t300\n1\tx\t5\t301\n")
    with pytest.raises(DataError, match=r"u\.data, line 2: column 'movie_id' must hold integers, found 'x'"):
        MovieLensSource(variant="ml-100k", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u\.data: the file is empty"):
        MovieLensSource(variant="ml-100k", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n1,11,high,101\n")
    with pytest.raises(DataError, match=r"ratings\.csv, line 3: column 'rating' must be a number, found 'high'"):
        MovieLensSource(variant="ml-20m", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n1,1.5,4,101\n")
    with pytest.raises(DataError, match=r"ratings\.csv, line 3: column 'movie_id' must hold integers, found '1.5'"):
        MovieLensSource(variant="ml-20m", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "ratings.dat").write_text("1::10::5::300\n1::11::4::301\n1::12::4\n")  # cut mid-line
    with pytest.raises(DataError, match=r"ratings\.dat, line 3: column 'timestamp' must hold integers"):
        MovieLensSource(variant="ml-1m", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "ratings.csv").write_text("userId,item,rating,timestamp\n1,10,4.5,100\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['movie_id'\]"):
        MovieLensSource(variant="ml-20m", data_dir=str(tmp_path), download=False).load()
    (tmp_path / "ratings.dat").unlink()  # ratings.dat comes first when both are there
    raw = gzip.compress(b"user_id,movie_id,rating,timestamp,seq_pos\n" + b"1,2,3,4,0\n" * 2000)
    (tmp_path / "ratings_ordered.csv.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"ratings_ordered\.csv\.gz: unreadable, truncated or corrupt file"):
        MovieLensSource(variant="ml-1m", data_dir=str(tmp_path), download=False).load()


# ============================================================================ MovieLens: download


def test_movielens_missing_files_without_download(tmp_path):
    data_dir = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        MovieLensSource(variant="ml-1m", data_dir=str(data_dir), download=False).load()
    message = str(info.value)
    assert str(data_dir / "ratings.dat") in message and "download" in message
    assert not data_dir.exists()


def _bad_mirror(tmp_path: Path, variant: str) -> str:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / f"{variant}.zip", "w") as zf:
        zf.writestr(f"{variant}/u.data", "1\t10\t5\t300\n")
    return mirror.as_uri() + "/"


def test_download_checksum_mismatch_leaves_cache_as_it_was(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "other.txt").write_text("already here")
    source = MovieLensSource(variant="ml-100k", cache_dir=str(cache), mirror=_bad_mirror(tmp_path, "ml-100k"))
    with pytest.raises(DataError, match="checksum mismatch") as info:
        source.load()
    assert "ml-100k.zip" in str(info.value)
    assert sorted(p.name for p in cache.iterdir()) == ["other.txt"]


def test_download_failure_into_new_cache_dir_leaves_nothing(tmp_path):
    cache = tmp_path / "new" / "cache"
    source = MovieLensSource(variant="ml-1m", cache_dir=str(cache), mirror=_bad_mirror(tmp_path, "ml-1m"))
    with pytest.raises(DataError, match="checksum mismatch"):
        source.load()
    assert not (tmp_path / "new").exists()


def test_download_unreachable_mirror(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    source = MovieLensSource(variant="ml-20m", cache_dir=str(cache), mirror=(tmp_path / "absent").as_uri() + "/")
    with pytest.raises(DataError, match="could not download") as info:
        source.load()
    assert str(cache / "ml-20m") in str(info.value)  # says where to put the files
    assert list(cache.iterdir()) == []


# ============================================================================ MovieLens: the shared copies


@pytest.fixture(scope="module")
def shared_ml1m() -> InteractionDataModule:
    data_dir = SHARED_DATA / "ml-1m"
    if not (data_dir / "ratings_ordered.csv.gz").exists() and not (data_dir / "ratings.dat").exists():
        pytest.skip(f"no ML-1M copy in {data_dir}")
    dm = InteractionDataModule(MovieLensSource(variant="ml-1m", data_dir=str(data_dir), download=False))
    dm.setup("fit")
    return dm


def test_shared_ml1m_counts(shared_ml1m):
    dm = shared_ml1m
    assert (dm.num_users, dm.num_items, dm.store.num_interactions) == (6040, 3706, 1_000_209)
    assert dm.store.num_dropped_users == 0
    assert len(dm.split.val) == len(dm.split.test) == 6040
    assert dm.train_item_counts.sum() == 1_000_209 - 2 * 6040
    assert dm.item_titles[int(np.searchsorted(dm.store.item_raw_ids[1:], 1)) + 1] == "Toy Story (1995)"


def test_shared_ml1m_order_matches_the_sequence_file(shared_ml1m):
    import pandas as pd

    seq_file = SHARED_DATA / "ml-1m" / "ml-1m_seq.txt.gz"
    if not seq_file.exists():
        pytest.skip(f"{seq_file} absent")
    # Users ascending, each user's movies in time order, original ids.
    expected = pd.read_csv(seq_file, sep=" ", header=None, names=["user", "movie"], engine="c")
    store = shared_ml1m.store
    np.testing.assert_array_equal(np.repeat(store.user_raw_ids, store.lengths), expected["user"].to_numpy())
    np.testing.assert_array_equal(store.item_raw_ids[store.items], expected["movie"].to_numpy())


def test_shared_ml100k():
    data_dir = SHARED_DATA / "ml-100k"
    if not (data_dir / "u.data").exists():
        pytest.skip(f"no ML-100K copy in {data_dir}")
    dm = InteractionDataModule(
        MovieLensSource(variant="ml-100k", data_dir=str(data_dir), download=False), use_item_features=True
    )
    assert (dm.num_users, dm.num_items, dm.store.num_interactions) == (943, 1682, 100_000)
    assert dm.item_titles[1] == "Toy Story (1995)"
    assert dm.num_item_features == 19
    assert dm.item_features[1, dm.genre_names.index("Animation")] == 1


# ============================================================================ InteractionLogSource

_LOG_ROWS = [(7, 100, 30), (5, 200, 10), (7, 300, 10), (5, 100, 20), (7, 200, 20)]


def _write_log(path: Path, fmt: str, columns=("user_id", "item_id", "timestamp"), rows=_LOG_ROWS) -> Path:
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join([sep.join(columns), *(sep.join(map(str, r)) for r in rows)]) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(columns)}), path)
    elif fmt == "csv.gz":
        text = "\n".join([",".join(columns), *(",".join(map(str, r)) for r in rows)]) + "\n"
        path.write_bytes(gzip.compress(text.encode()))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_log_source_formats(tmp_path, hf_cache, fmt):
    path = _write_log(tmp_path / f"log.{fmt}", fmt)
    log = InteractionLogSource(str(path)).load()
    assert log.name == str(path)
    np.testing.assert_array_equal(log.user_ids, [7, 5, 7, 5, 7])
    np.testing.assert_array_equal(log.item_ids, [100, 200, 300, 100, 200])
    np.testing.assert_array_equal(log.order, [30, 10, 10, 20, 20])
    np.testing.assert_array_equal(log.timestamps, log.order)
    assert log.user_ids.dtype == log.item_ids.dtype == np.int64
    store = build_sequences(log, min_interactions=1)
    assert _raw_sequences(store) == {5: [200, 100], 7: [300, 200, 100]}


def test_log_source_custom_columns_and_extra_columns(tmp_path, hf_cache):
    rows = [(r[0], r[1], r[2], 4.5) for r in _LOG_ROWS]
    path = _write_log(tmp_path / "events.csv", "csv", columns=("uid", "movie", "when", "score"), rows=rows)
    log = InteractionLogSource(str(path), user_column="uid", item_column="movie", order_column="when").load()
    np.testing.assert_array_equal(log.item_ids, [100, 200, 300, 100, 200])
    np.testing.assert_array_equal(log.order, [30, 10, 10, 20, 20])


def test_log_source_explicit_format_and_delimiter(tmp_path, hf_cache):
    path = tmp_path / "events.txt"
    path.write_text("user_id;item_id;timestamp\n1;2;3\n1;4;5\n")
    with pytest.raises(DataError, match="cannot tell the file format"):
        InteractionLogSource(str(path)).load()
    log = InteractionLogSource(str(path), file_format="csv", delimiter=";").load()
    np.testing.assert_array_equal(log.item_ids, [2, 4])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_log_source_datetime_order(tmp_path, hf_cache, fmt):
    stamps = ["2001-01-02 00:00:00", "2001-01-01T00:00:00", "2001-01-01T00:00:01"]
    rows = [(1, 10, stamps[0]), (1, 20, stamps[1]), (2, 30, stamps[2])]
    path = tmp_path / f"log.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        when = np.array(["2001-01-02T00:00:00", *stamps[1:]], dtype="datetime64[s]")
        pq.write_table(pa.table({"user_id": [1, 1, 2], "item_id": [10, 20, 30], "timestamp": when}), path)
    else:
        _write_log(path, fmt, rows=rows)
    log = InteractionLogSource(str(path)).load()
    np.testing.assert_array_equal(log.order, [978393600, 978307200, 978307201])  # seconds since 1970 UTC
    assert log.order.dtype == np.int64


def test_log_source_to_datamodule_temporal_split(tmp_path, hf_cache):
    # The hand-made clock of test_temporal_split_exact, through a csv file and the DataModule.
    events = [(1, 0), (2, 1), (2, 2), (1, 3), (2, 4), (2, 5), (1, 6), (3, 7), (1, 8), (1, 9)]
    path = _write_log(tmp_path / "clock.csv", "csv", rows=[(u, 100 + t, t) for u, t in events])
    dm = InteractionDataModule(
        InteractionLogSource(str(path)), split="temporal", val_fraction=0.2, test_fraction=0.2,
        min_interactions=1, max_seq_len=4,
    )
    assert dm.summary()["val_queries"] == dm.summary()["test_queries"] == 1
    (val,) = list(dm.val_dataloader())
    (test,) = list(dm.test_dataloader())
    assert val.targets.tolist() == [[7]] and val.exclude_items.tolist() == [1, 4]
    assert val.input_ids.tolist() == [[0, 0, 1, 4]]
    assert test.targets.tolist() == [[9, 10]]  # multi-target
    assert test.exclude_items.tolist() == [1, 4, 7] and test.exclude_offsets.tolist() == [0, 3]
    assert test.input_ids.tolist() == [[0, 1, 4, 7]]
    # Training: user 1's items before the validation period, user 2's four items.
    assert dm.train_item_counts.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def _assert_no_partial_cache(cache: Path) -> None:
    leftovers = [p for p in cache.rglob("*") if p.suffix == ".arrow" or "incomplete" in p.name and p.is_dir()]
    assert leftovers == []


def test_log_source_missing_column(tmp_path, hf_cache):
    path = _write_log(tmp_path / "log.csv", "csv", columns=("user_id", "movie", "timestamp"))
    with pytest.raises(DataError) as info:
        InteractionLogSource(str(path)).load()
    message = str(info.value)
    assert str(path) in message and "['item_id']" in message
    assert "['user_id', 'movie', 'timestamp']" in message  # what the file has


def test_log_source_empty_and_header_only(tmp_path, hf_cache):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: the file is empty"):
        InteractionLogSource(str(empty)).load()
    header_only = tmp_path / "header.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match=f"{header_only}: the file has no rows"):
        InteractionLogSource(str(header_only)).load()
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        InteractionLogSource(str(empty_jsonl)).load()


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_log_source_text_ids(tmp_path, hf_cache, fmt):
    """Text ids (Amazon, Last.fm style) are ids like any other: they are remapped to contiguous indices."""
    rows = [("A9GJ", "10", 1), ("A9GJ", "11", 2), ("A9GJ", "abc", 3), ("B7XQ", "12", 4)]
    path = _write_log(tmp_path / f"log.{fmt}", fmt, rows=rows)
    log = InteractionLogSource(str(path)).load()
    assert log.user_ids.tolist() == ["A9GJ", "A9GJ", "A9GJ", "B7XQ"] and log.item_ids.tolist() == ["10", "11", "abc", "12"]
    store = build_sequences(log, min_interactions=1)
    assert store.num_users == 2 and store.num_items == 4 and store.user_raw_ids.tolist() == ["A9GJ", "B7XQ"]


def test_log_source_text_id_far_down_a_big_csv(tmp_path, hf_cache):
    # datasets types csv blocks from their first rows: a text id later on is a cast error, after
    # which the columns are read as text.
    lines = ["user_id,item_id,timestamp", *(f"{i % 50},{i},{i}" for i in range(25_000))]
    lines[15_001] = "3,abc,15000"
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    log = InteractionLogSource(str(path)).load()
    assert log.item_ids[15_000] == "abc" and log.item_ids[0] == "0" and len(log.item_ids) == 25_000


@pytest.mark.parametrize("bad, message", [("2.5", "must hold integers, found '2.5'"), ("", "is empty")])
def test_log_source_bad_id_values(tmp_path, hf_cache, bad, message):
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp\n1,10,1\n{bad},11,2\n")
    with pytest.raises(DataError, match=rf"log\.csv, line 3: column 'user_id' {message}"):
        InteractionLogSource(str(path)).load()


def test_log_source_negative_ids_are_integers(tmp_path, hf_cache):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n-1,10,1\n2,-11,2\n")
    np.testing.assert_array_equal(InteractionLogSource(str(path)).load().item_ids, [10, -11])


def test_log_source_bad_order_value(tmp_path, hf_cache):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,10,2001-01-01\n1,11,yesterday\n")
    with pytest.raises(DataError, match="line 3: column 'timestamp' must be a number or an ISO 8601 timestamp"):
        InteractionLogSource(str(path)).load()
    path.write_text("user_id,item_id,timestamp\n1,10,5\n1,11,\n")
    with pytest.raises(DataError, match="line 3: column 'timestamp' is empty"):
        InteractionLogSource(str(path)).load()


def test_log_source_truncated_gzip(tmp_path, hf_cache):
    rows = [(u % 97, u, u) for u in range(5000)]
    good = _write_log(tmp_path / "good.csv.gz", "csv.gz", rows=rows)
    path = tmp_path / "log.csv.gz"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{path}: unreadable, truncated or corrupt file"):
        InteractionLogSource(str(path)).load()
    _assert_no_partial_cache(hf_cache)


def test_log_source_corrupt_parquet(tmp_path, hf_cache):
    good = _write_log(tmp_path / "good.parquet", "parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all\n" * 10)
    for path in (truncated, garbage):
        with pytest.raises(DataError, match=f"{path}: unreadable, truncated or corrupt file"):
            InteractionLogSource(str(path)).load()
    _assert_no_partial_cache(hf_cache)


def test_log_source_malformed_json(tmp_path, hf_cache):
    path = tmp_path / "log.jsonl"
    path.write_text('{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1, "item_id": \n')
    with pytest.raises(DataError, match=f"{path}: could not be parsed as json"):
        InteractionLogSource(str(path)).load()


def test_log_source_nonexistent_path(tmp_path, hf_cache):
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=f"{path}: file not found"):
        InteractionLogSource(str(path)).load()
    assert not hf_cache.exists()


def test_log_source_glob(tmp_path, hf_cache):
    _write_log(tmp_path / "part-1.csv", "csv", rows=_LOG_ROWS[:2])
    _write_log(tmp_path / "part-2.csv", "csv", rows=_LOG_ROWS[2:])
    log = InteractionLogSource(str(tmp_path / "part-*.csv")).load()
    assert sorted(log.item_ids.tolist()) == sorted(r[1] for r in _LOG_ROWS)


def test_batches_carry_each_input_items_time(tmp_path, hf_cache, synth_dm):
    """Train and query batches hold, at every real position, the time of that very event (0 at padding)."""
    rng = np.random.default_rng(0)
    rows, time_of = [], {}
    for user in range(1, 9):
        items = rng.choice(np.arange(100, 160), size=int(rng.integers(4, 9)), replace=False)
        clock = 1_000_000 + np.cumsum(rng.integers(1, 10_000, size=len(items)))
        for item, when in zip(items.tolist(), clock.tolist()):
            rows.append((user, item, when))
            time_of[user, item] = when
    rng.shuffle(rows)
    path = _write_log(tmp_path / "log.csv", "csv", rows=rows)
    dm = InteractionDataModule(InteractionLogSource(str(path)), min_interactions=1, max_seq_len=5, batch_size=4)
    store = dm.store
    batches = [*dm.train_dataloader(), *dm.val_dataloader(), *dm.test_dataloader()]
    assert {type(b).__name__ for b in batches} == {"TrainBatch", "QueryBatch"}
    for batch in batches:
        assert batch.timestamps.shape == batch.input_ids.shape and batch.timestamps.dtype == torch.int64
        for row, user in enumerate(batch.user_ids.tolist()):
            expected = [time_of[int(store.user_raw_ids[user]), int(store.item_raw_ids[i])] if i else 0
                        for i in batch.input_ids[row].tolist()]
            assert batch.timestamps[row].tolist() == expected
    # A source without times: no timestamps in the batches.
    assert next(iter(synth_dm.train_dataloader())).timestamps is None
    assert next(iter(synth_dm.val_dataloader())).timestamps is None


def test_shared_ml1m_missing_times_come_from_the_users_own_clock(shared_ml1m):
    """The third of ML-1M's times that the shared copy lacks are filled per user: every user's times are
    non-decreasing, the known ones are untouched, and the temporal split is the one the old rule (every
    missing time at the log's earliest) gave."""
    import dataclasses

    import pandas as pd

    path = SHARED_DATA / "ml-1m" / "ratings_ordered.csv.gz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    store = shared_ml1m.store
    frame = pd.read_csv(path).sort_values(["user_id", "seq_pos"])  # the store's order: users ascending, then seq_pos
    file_times = frame["timestamp"].to_numpy()
    missing = np.isnan(file_times)
    assert missing.sum() == 1_000_209 - 663_062
    np.testing.assert_array_equal(store.timestamps[~missing], file_times[~missing].astype(np.int64))
    same_user = np.repeat(np.arange(store.num_users), store.lengths)
    step = np.diff(store.timestamps)[same_user[1:] == same_user[:-1]]
    assert (step >= 0).all()
    old_rule = np.where(missing, np.nanmin(file_times), file_times).astype(np.int64)
    new, old = temporal_split(store), temporal_split(dataclasses.replace(store, timestamps=old_rule))
    np.testing.assert_array_equal(new.train_end, old.train_end)
    for stage in ("val", "test"):
        for field in ("users", "history_end", "target_end"):
            np.testing.assert_array_equal(getattr(getattr(new, stage), field), getattr(getattr(old, stage), field))
