"""Per-user interaction sequences stored compactly, and the splits built on them.

Everything here works on whole numpy columns: no Python loop over users or rows.

A ``SequenceStore`` holds every user's items in time order as one flat array plus
offsets (CSR layout): user ``u`` owns ``items[offsets[u]:offsets[u + 1]]``. Item ids
are contiguous ``1..num_items``; ``0`` is reserved for padding.

A ``QuerySet`` describes evaluation queries without copying items: query ``i`` is
user ``users[i]`` whose history is ``items[offsets[u]:history_end[i]]`` and whose
targets are ``items[history_end[i]:target_end[i]]``. Both the leave-one-out and the
global temporal split are of this form, because histories are always prefixes of a
user's time-ordered sequence. So is the split of a source whose queries come with their own roles
(``query_split``: a BEIR folder's train / dev / test queries), where a query's "history" is empty and
all its relevant items are its targets.
"""

from __future__ import annotations

from collections.abc import Mapping

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from rails_lightning.errors import DataError

if TYPE_CHECKING:
    from rails_lightning.data.item_content import ItemContent

PADDING_ID = 0
log_message = logging.getLogger(__name__)


@dataclass
class InteractionLog:
    """Raw interactions as a source reads them, one row per event.

    ``order`` sorts each user's events in time (a timestamp or a position);
    ``timestamps`` (optional) places events on one global clock for the temporal split.
    ``item_titles`` / ``item_genres`` map raw item ids to metadata when the source has it;
    ``item_content`` (an ``ItemContent``) holds its text, categorical and numeric columns.
    ``actions`` (optional) says what each event was, as a bitmask over ``action_names`` (bit a set: the
    event is of action type ``action_names[a]``; ``rails_lightning.data.actions``).
    ``catalogue`` (optional) lists every item of the corpus, also those nobody interacted with (a
    catalogue larger than its log); without it the corpus is the items of the log.

    Sources whose users are text queries (``rails_lightning.data.beir``) also give ``query_texts`` (raw user
    id -> the query's text), ``query_roles`` (raw user id -> ``train``, ``val`` or ``test``: the source's own
    split, ``query_split_description`` saying how it was made) and ``relevance`` (each row's graded relevance
    score; None when every relevant row counts the same).
    """

    user_ids: np.ndarray  # (M,) int64 raw ids
    item_ids: np.ndarray  # (M,) int64 raw ids
    order: np.ndarray  # (M,) sortable numbers
    name: str
    timestamps: np.ndarray | None = None  # (M,) or None
    item_titles: Mapping[int, str] | None = None
    item_genres: dict[int, list[str]] | None = None
    item_clusters: Mapping[int, int] | np.ndarray | None = None  # indexed by raw item id
    catalogue: np.ndarray | None = None  # (N,) raw item ids, or None
    item_content: ItemContent | None = None
    actions: np.ndarray | None = None  # (M,) int64 bitmasks over action_names, or None
    action_names: tuple[str, ...] = ()
    relevance: np.ndarray | None = None  # (M,) float graded relevance of each row, or None (binary)
    query_texts: Mapping[Any, str] | None = None
    query_roles: Mapping[Any, str] | None = None
    query_split_description: str = ""


@dataclass
class SequenceStore:
    """Every kept user's items in time order (CSR), with the id mappings."""

    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (M,) int64 contiguous item ids in 1..N
    timestamps: np.ndarray | None  # (M,) aligned with items, or None
    user_raw_ids: np.ndarray  # (U,) raw id of each contiguous user index
    item_raw_ids: np.ndarray  # (N + 1,) raw id of each contiguous item id; [0] = -1 (padding)
    num_dropped_users: int
    actions: np.ndarray | None = None  # (M,) int64 action bitmasks aligned with items, or None
    action_names: tuple[str, ...] = ()
    relevance: np.ndarray | None = None  # (M,) float32 graded relevance aligned with items, or None (binary)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def build_sequences(log: InteractionLog, min_interactions: int, drop_consecutive_repeats: bool = False) -> SequenceStore:
    """Drop duplicate rows and users with fewer than ``min_interactions`` events, remap ids, sort by time.

    A row that repeats an earlier row's (user, item, order) is an exact duplicate (a log written
    twice) and is dropped; ``drop_consecutive_repeats`` also collapses a user's runs of the same
    item at different times (A A B -> A B), for logs where a repeat is a re-click, not a new event.
    """
    if len(log.user_ids) == 0:
        raise DataError(f"{log.name}: no interactions")
    # Exact duplicates: equal (user, order, item) rows are adjacent after a stable sort on them.
    by_key = np.lexsort((log.item_ids, log.order, log.user_ids))
    same = (log.user_ids[by_key][1:] == log.user_ids[by_key][:-1]) & (log.order[by_key][1:] == log.order[by_key][:-1])
    same &= log.item_ids[by_key][1:] == log.item_ids[by_key][:-1]
    keep_row = np.ones(len(log.user_ids), dtype=bool)
    keep_row[by_key[1:][same]] = False  # the later copies (the stable sort keeps file order within a key)
    num_duplicates = int((~keep_row).sum())
    if num_duplicates:
        log_message.warning("%s: dropped %d duplicate (user, item, order) rows", log.name, num_duplicates)
    user_ids, item_ids, order = log.user_ids[keep_row], log.item_ids[keep_row], log.order[keep_row]
    timestamps_in = None if log.timestamps is None else log.timestamps[keep_row]
    actions_in = None if log.actions is None else log.actions[keep_row]
    relevance_in = None if log.relevance is None else log.relevance[keep_row]
    if drop_consecutive_repeats:
        by_time = np.lexsort((order, user_ids))
        repeat = np.zeros(len(user_ids), dtype=bool)
        repeat[by_time[1:]] = (user_ids[by_time][1:] == user_ids[by_time][:-1]) & (item_ids[by_time][1:] == item_ids[by_time][:-1])
        user_ids, item_ids, order = user_ids[~repeat], item_ids[~repeat], order[~repeat]
        timestamps_in = None if timestamps_in is None else timestamps_in[~repeat]
        actions_in = None if actions_in is None else actions_in[~repeat]
        relevance_in = None if relevance_in is None else relevance_in[~repeat]
    raw_users, user_index, user_counts = np.unique(user_ids, return_inverse=True, return_counts=True)
    keep_user = user_counts >= min_interactions
    if not keep_user.any():
        raise DataError(
            f"{log.name}: no user has at least {min_interactions} interactions (largest: {user_counts.max()}); "
            "lower --data.min_interactions"
        )
    # Renumber kept users 0..U-1, keeping raw-id order.
    new_user_index = np.cumsum(keep_user) - 1
    row_kept = keep_user[user_index]
    users = new_user_index[user_index[row_kept]]
    if log.catalogue is None:
        raw_items, items = np.unique(item_ids[row_kept], return_inverse=True)
    else:  # every catalogue item is in the corpus, consumed or not
        raw_items = np.union1d(log.catalogue, item_ids[row_kept])
        items = np.searchsorted(raw_items, item_ids[row_kept])
    items = items.astype(np.int64) + 1  # 0 is padding
    order = order[row_kept]
    # lexsort is stable: ties in `order` keep the file's row order.
    perm = np.lexsort((order, users))
    counts = np.bincount(users, minlength=int(keep_user.sum()))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    timestamps = None if timestamps_in is None else timestamps_in[row_kept][perm]
    actions = None if actions_in is None else actions_in[row_kept][perm]
    relevance = None if relevance_in is None else relevance_in[row_kept][perm].astype(np.float32)
    padding = np.array([-1]) if raw_items.dtype.kind in "iu" else np.array(["<pad>"])
    return SequenceStore(
        offsets=offsets,
        items=items[perm],
        timestamps=timestamps,
        actions=actions,
        action_names=tuple(log.action_names) if actions is not None else (),
        relevance=relevance,
        user_raw_ids=raw_users[keep_user],
        item_raw_ids=np.concatenate([padding.astype(raw_items.dtype), raw_items]),
        num_dropped_users=int((~keep_user).sum()),
    )


def without_targets(exclude_offsets: np.ndarray, exclude_items: np.ndarray, targets: np.ndarray, num_items: int):
    """Drop from each query's exclusion list (CSR) the query's own targets (Q, T; 0 = padding): a user's
    history may hold the item they consume again, and that item must stay rankable."""
    rows = np.repeat(np.arange(len(exclude_offsets) - 1), np.diff(exclude_offsets))
    target_rows = np.repeat(np.arange(len(targets)), targets.shape[1])
    target_keys = (target_rows * (num_items + 1) + targets.reshape(-1))[targets.reshape(-1) > 0]
    keep = ~np.isin(rows * (num_items + 1) + exclude_items, target_keys)
    offsets = np.zeros_like(exclude_offsets)
    np.cumsum(np.bincount(rows[keep], minlength=len(exclude_offsets) - 1), out=offsets[1:])
    return offsets, exclude_items[keep]


@dataclass
class QuerySet:
    """Evaluation queries: history ``items[offsets[u]:history_end]``, targets up to ``target_end``."""

    users: np.ndarray  # (Q,) int64 user index
    history_end: np.ndarray  # (Q,) int64 absolute index into store.items
    target_end: np.ndarray  # (Q,) int64

    def __len__(self) -> int:
        return len(self.users)

    @property
    def max_targets(self) -> int:
        return int((self.target_end - self.history_end).max(initial=1))


@dataclass
class Split:
    """Training sequences (``items[offsets[u]:train_end[u]]``) and val / test queries."""

    train_end: np.ndarray  # (U,) int64
    val: QuerySet
    test: QuerySet


def leave_one_out_split(store: SequenceStore) -> Split:
    """Last item is the test target, second-to-last the validation target, the rest trains."""
    if store.lengths.min() < 3:
        raise DataError("leave-one-out needs at least 3 interactions per user (set min_interactions >= 3)")
    users = np.arange(store.num_users, dtype=np.int64)
    end = store.offsets[1:]
    return Split(
        train_end=end - 2,
        val=QuerySet(users, history_end=end - 2, target_end=end - 1),
        test=QuerySet(users, history_end=end - 1, target_end=end),
    )


def temporal_split(store: SequenceStore, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """One global clock: the latest ``test_fraction`` of events are test targets, the
    ``val_fraction`` before them validation targets. A user's history is everything
    they did before the cut; users with no history or no target get no query.
    Multi-target queries: report Recall@K."""
    if store.timestamps is None:
        raise DataError("the temporal split needs timestamps, and this source has none")
    ts = store.timestamps
    val_start, test_start = np.quantile(ts, [1.0 - val_fraction - test_fraction, 1.0 - test_fraction])
    starts = store.offsets[:-1]
    # Per-user cut points; timestamps are sorted within each user, so counting works.
    user_of_row = np.repeat(np.arange(store.num_users), store.lengths)
    before_val = np.bincount(user_of_row, weights=ts < val_start, minlength=store.num_users).astype(np.int64)
    before_test = np.bincount(user_of_row, weights=ts < test_start, minlength=store.num_users).astype(np.int64)
    val_cut, test_cut, end = starts + before_val, starts + before_test, store.offsets[1:]

    def queries(history_end: np.ndarray, target_end: np.ndarray) -> QuerySet:
        ok = (history_end > starts) & (target_end > history_end)
        users = np.flatnonzero(ok).astype(np.int64)
        return QuerySet(users, history_end[ok], target_end[ok])

    return Split(train_end=val_cut, val=queries(val_cut, test_cut), test=queries(test_cut, end))


def draw_cold_items(item_counts: np.ndarray, fraction: float, strata: int, seed: int) -> np.ndarray:
    """(N + 1,) event counts of the items ([0]: padding) -> (N + 1,) mask of the items held out as cold-start items.

    The items are ranked by count (ties in a random order) and cut into ``strata`` equal parts; from each part
    round(fraction x its size) items are drawn at random, so that the held-out items are popular and rare alike
    rather than mostly rare, as a uniform draw over a long-tailed catalogue would make them."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, len(item_counts))
    ranked = ids[np.lexsort((rng.random(len(ids)), item_counts[1:]))]  # least popular first
    cold = np.zeros(len(item_counts), dtype=bool)
    for stratum in np.array_split(ranked, strata):
        cold[rng.choice(stratum, size=round(fraction * len(stratum)), replace=False)] = True
    return cold


def without_items(store: SequenceStore, dropped: np.ndarray) -> tuple[SequenceStore, np.ndarray]:
    """The store without any event of the ``dropped`` items ((N + 1,) mask; the users and item ids stay), and
    (M + 1,) the number of kept events before each position of ``store.items`` (and before its end): a prefix of a
    user's sequence that ends at position p of ``store`` ends at ``kept_before[p]`` in the new store, without the
    dropped events."""
    keep = ~dropped[store.items]  # (M,)
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    kept = replace(
        store,
        offsets=kept_before[store.offsets],
        items=store.items[keep],
        timestamps=None if store.timestamps is None else store.timestamps[keep],
        actions=None if store.actions is None else store.actions[keep],
    )
    return kept, kept_before


QUERY_ROLES = ("train", "val", "test")


def query_split(store: SequenceStore, roles: np.ndarray) -> Split:
    """The source's own split of its queries, ``roles`` (U,) ``train`` / ``val`` / ``test`` per user: a training
    query trains on every one of its items; a validation or test query has an empty history and all its items
    as targets (so nothing is excluded from its ranking)."""
    unknown = sorted(set(np.unique(roles).tolist()) - set(QUERY_ROLES))
    if unknown:
        raise DataError(f"query roles must be {list(QUERY_ROLES)}, found {unknown}")
    starts, ends = store.offsets[:-1], store.offsets[1:]
    train_end = np.where(roles == "train", ends, starts)

    def queries(role: str) -> QuerySet:
        users = np.flatnonzero(roles == role).astype(np.int64)
        return QuerySet(users, history_end=starts[users], target_end=ends[users])

    return Split(train_end=train_end, val=queries("val"), test=queries("test"))


def gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``values[starts[i]:ends[i]]`` for all i; returns (offsets (Q+1,), flat)."""
    lengths = np.maximum(ends - starts, 0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Index of each output element into `values`: its range start plus its position in the range.
    flat_index = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets, values[flat_index]


def last_window(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` values of each range, left-padded with 0: (Q, length)."""
    index = ends[:, None] - length + np.arange(length)[None, :]  # (Q, length)
    valid = index >= starts[:, None]
    return np.where(valid, values[np.clip(index, 0, max(len(values) - 1, 0))], PADDING_ID)
