"""The one LightningDataModule of user-item interactions that every model shares."""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import cached_property
from typing import Callable, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.data.item_content import ItemContent
from rails_lightning.data.sequences import (
    DataError,
    QuerySet,
    SequenceStore,
    Split,
    build_sequences,
    draw_cold_items,
    gather_ranges,
    last_window,
    leave_one_out_split,
    query_split,
    temporal_split,
    without_items,
    without_targets,
)
from rails_lightning.data.source import InteractionSource
from rails_lightning.data.synthetic import SyntheticSource
from rails_lightning.errors import ConfigError

log = logging.getLogger(__name__)

#: The target groups a cold split adds: the targets that are cold-start items, and the others.
COLD_GROUPS = ("cold", "warm")


class _TrainSequences(Dataset):
    """Indexed by a list of users (a whole batch at a time, built with array ops)."""

    def __init__(self, store: SequenceStore, train_end: np.ndarray, max_seq_len: int) -> None:
        self.items, self.starts, self.ends, self.length = store.items, store.offsets[:-1], train_end, max_seq_len
        self.timestamps, self.actions = store.timestamps, store.actions
        self.users = np.flatnonzero(train_end - self.starts >= 2)  # need one input and one target

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: list[int]) -> TrainBatch:
        users = self.users[np.asarray(index)]
        window = last_window(self.items, self.starts[users], self.ends[users], self.length + 1)  # (B, L + 1)
        # Copies, not views of `window`: a strided batch tensor breaks `.view()` in the models.
        inputs = np.ascontiguousarray(window[:, :-1])
        targets = np.where(inputs > 0, window[:, 1:], 0)  # no target without at least one input item
        # The inputs' times and actions: the window of L + 1 without its last event (a target's).
        timestamps, actions = (
            None if values is None else torch.from_numpy(last_window(values, self.starts[users], self.ends[users] - 1, self.length))
            for values in (self.timestamps, self.actions)
        )
        return TrainBatch(
            user_ids=torch.from_numpy(users),
            input_ids=torch.from_numpy(inputs),
            target_ids=torch.from_numpy(targets),
            timestamps=timestamps,
            actions=actions,
        )


class _TrainPairs(Dataset):
    """One row per (training query, relevant item) pair, for sources whose queries are texts (``split=by_query``):
    the query encoder reads the query (its user index), not a history, so the input is one padding position and
    the target the item. Indexed by a list of pairs (a whole batch at a time)."""

    def __init__(self, store: SequenceStore, train_end: np.ndarray) -> None:
        starts = store.offsets[:-1]
        counts = np.maximum(train_end - starts, 0)
        self.users = np.repeat(np.arange(store.num_users, dtype=np.int64), counts)  # (P,)
        _, self.items = gather_ranges(store.items, starts, train_end)  # (P,)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: list[int]) -> TrainBatch:
        index = np.asarray(index)
        return TrainBatch(
            user_ids=torch.from_numpy(self.users[index]),
            input_ids=torch.zeros(len(index), 1, dtype=torch.long),  # (B, 1): no history
            target_ids=torch.from_numpy(self.items[index][:, None]),  # (B, 1)
        )


class _Queries(Dataset):
    """Evaluation queries, a whole batch at a time: each query's targets come from ``store``; its history (the
    model's input, its times and actions, and the items it excludes) from ``history_store``, where it ends at
    ``history_end`` (the same store, or one without the held-out cold items' events)."""

    def __init__(
        self, store: SequenceStore, queries: QuerySet, max_seq_len: int, history_store: SequenceStore, history_end: np.ndarray,
        group_bits: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None,
    ) -> None:
        self.store, self.queries, self.length = store, queries, max_seq_len
        self.history_store, self.history_end = history_store, history_end  # (Q,) ends in history_store
        self.max_targets = queries.max_targets
        self.group_bits = group_bits  # (targets (B, T), their actions (B, T) or None) -> (B, T) group bitmasks

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: list[int]) -> QueryBatch:
        q, index = self.queries, np.asarray(index)
        users, target_start, target_end = q.users[index], q.history_end[index], q.target_end[index]
        history, history_end = self.history_store, self.history_end[index]
        starts = history.offsets[users]
        inputs = last_window(history.items, starts, history_end, self.length)  # (B, L)
        # Targets right after the history, padded to T columns.
        targets = last_window(self.store.items, target_start, target_end, self.max_targets)  # (B, T)
        exclude_offsets, exclude_items = gather_ranges(history.items, starts, history_end)
        # The history is excluded from the ranking, but never the query's own target(s).
        exclude_offsets, exclude_items = without_targets(exclude_offsets, exclude_items, targets, self.store.num_items)
        # The history's times and actions, aligned with inputs.
        timestamps, actions = (
            None if values is None else torch.from_numpy(last_window(values, starts, history_end, self.length))
            for values in (history.timestamps, history.actions)
        )
        target_groups = None
        if self.group_bits is not None:
            target_actions = None if self.store.actions is None else last_window(self.store.actions, target_start, target_end, self.max_targets)
            target_groups = torch.from_numpy(self.group_bits(targets, target_actions))
        gains = None
        if self.store.relevance is not None:  # each target's graded relevance, aligned with targets
            gains = torch.from_numpy(last_window(self.store.relevance, target_start, target_end, self.max_targets)).float()
        return QueryBatch(
            user_ids=torch.from_numpy(users),
            input_ids=torch.from_numpy(inputs),
            targets=torch.from_numpy(targets),
            exclude_offsets=torch.from_numpy(exclude_offsets),
            exclude_items=torch.from_numpy(exclude_items),
            timestamps=timestamps,
            actions=actions,
            target_groups=target_groups,
            target_gains=gains,
        )


class _ShardedBatches(DistributedSampler):
    """Whole batches of indices (lists) for one process of a distributed run.

    Training (``shuffle``): one permutation shared by every process (seeded by the run's seed and the
    epoch, so reproducible), cut into batches dealt round-robin; the list of batches is padded with its
    first ones to a multiple of the world size, so every process takes the same number of steps (DDP
    needs that). Evaluation: each process takes a contiguous slice of the queries, no padding, so the
    summed metrics equal one process's exactly.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size

    def _batches(self) -> list[list[int]]:
        n, world, rank = len(self.dataset), self.num_replicas, self.rank
        if not self.shuffle:
            share = -(-n // world)
            indices = list(range(rank * share, min(n, (rank + 1) * share)))
            return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        batches += batches[: (-len(batches)) % world]
        return batches[rank::world]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n, world = len(self.dataset), self.num_replicas
        if not self.shuffle:
            share = -(-n // world)
            return -(-max(0, min(n, (self.rank + 1) * share) - self.rank * share) // self.batch_size)
        return -(-(-(-n // self.batch_size)) // world)  # every process: ceil(batches / W)


def _batched_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, trainer: pl.Trainer | None = None
) -> DataLoader:
    if trainer is not None and trainer.world_size > 1:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, the same in every process
        sampler = _ShardedBatches(dataset, batch_size, trainer.world_size, trainer.global_rank, shuffle, seed)
    else:
        order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        sampler = BatchSampler(order, batch_size=batch_size, drop_last=False)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the dataset builds whole batches
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class InteractionDataModule(pl.LightningDataModule):
    """User-item interactions: loading, id remapping, splits, typed batches.

    Args:
        source: where interactions come from (``class_path`` in YAML).
        max_seq_len: history length the query encoder sees (the last items).
        batch_size: training sequences per batch (per process under DDP: the global batch is W times it).
        eval_batch_size: queries per validation / test batch (under DDP each process takes its slice of the queries).
        min_interactions: users with fewer interactions are dropped (not with ``split=by_query``: every query
            with a relevant item is kept).
        split: ``leave_one_out`` (last item test, second-to-last validation), ``temporal``
            (one global clock; the latest fractions of events are validation / test targets) or ``by_query``
            (for sources whose users are text queries with their own train / validation / test roles, such as
            ``BeirSource``: a training query trains on each of its relevant items; a validation or test query
            has no history and all its relevant items as targets).
        val_fraction: temporal split only: share of events in the validation period.
        test_fraction: temporal split only: share of events in the test period.
        use_item_features: expose item genres (when the source has them) to the item tower.
        target_groups: groups of evaluation targets whose metrics are also reported apart, as
            ``val/<group>/hr@10``, ... (each query's targets restricted to the group; queries without a
            target in it are left out): any of the events' action types (e.g. ``[liked, disliked]``: how well
            the model finds the next liked item, and how often it puts a disliked one in its top K).
        shuffle_history_actions: show the query encoder the events' action bitmasks permuted across all events
            (a seeded draw, ``action_shuffle_seed``) instead of their own: a control with the same parameters and
            the same distribution of action types, but no information in which event has which. Target groups
            keep the logged actions, so the evaluation is the same as without it.
        action_shuffle_seed: seed of that permutation.
        cold_item_fraction: share of the items held out as cold-start items (0: none), drawn at random within
            ``cold_item_strata`` popularity strata so that they are popular and rare alike. Training never sees
            them: every event of theirs leaves the training sequences (as input and as target) and no objective
            draws them as negatives. Evaluation keeps the usual queries and their targets, but a cold item in a
            query's history is dropped from it (the history the model reads, and the one excluded from its
            ranking, hold warm items only). Reported beside the usual metrics: the cold targets ranked against
            the whole corpus (``val/cold/hr@10``, ...), the warm ones (``val/warm/...``), and the cold targets
            ranked among the cold items alone (``val/cold_only/...``).
        cold_item_seed: seed of the draw of the cold items; None: the run's ``seed_everything`` (the CLI writes
            it into the run's config), 0 outside the CLI.
        cold_item_strata: popularity strata the cold items are drawn within (the items ranked by their number
            of events, cut into this many equal parts).
        drop_consecutive_repeats: collapse a user's consecutive events on the same item into one
            (for logs where a repeat is a re-click rather than a new consumption). Exact duplicate
            rows (same user, item and order) are always dropped.
        num_workers: DataLoader worker processes (0 is fastest here: batches are built with array ops).
    """

    def __init__(
        self,
        source: InteractionSource | None = None,
        max_seq_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        min_interactions: int = 5,
        split: Literal["leave_one_out", "temporal", "by_query"] = "leave_one_out",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        use_item_features: bool = False,
        target_groups: Sequence[str] = (),
        shuffle_history_actions: bool = False,
        action_shuffle_seed: int = 0,
        cold_item_fraction: float = 0.0,
        cold_item_seed: int | None = None,
        cold_item_strata: int = 10,
        drop_consecutive_repeats: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= cold_item_fraction < 1.0 or cold_item_strata < 1:
            raise ConfigError(
                f"--data.cold_item_fraction must be in [0, 1) and --data.cold_item_strata >= 1, got {cold_item_fraction} and {cold_item_strata}"
            )
        if cold_item_fraction > 0 and split == "by_query":  # its training pairs are not built from the warm events
            raise ConfigError("--data.cold_item_fraction works with the leave_one_out and temporal splits, not with split=by_query")
        self.source = source if source is not None else SyntheticSource()
        self.max_seq_len = max_seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.min_interactions = min_interactions
        self.split_kind = split
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.use_item_features = use_item_features
        self.target_groups = tuple(target_groups)
        self.shuffle_history_actions, self.action_shuffle_seed = shuffle_history_actions, action_shuffle_seed
        self.cold_item_fraction, self.cold_item_seed, self.cold_item_strata = cold_item_fraction, cold_item_seed, cold_item_strata
        self.drop_consecutive_repeats = drop_consecutive_repeats
        self.num_workers = num_workers

    # Loading is lazy and cached: the CLI reads `num_items` to build the model, and that
    # is the moment the data is first needed.
    @cached_property
    def store(self) -> SequenceStore:
        raw = self.source.load()
        self._raw = raw
        if (raw.query_roles is not None) != (self.split_kind == "by_query"):
            raise ConfigError(
                f"{raw.name}: its queries come with their own split (train / validation / test): use --data.split=by_query"
                if raw.query_roles is not None else
                f"--data.split=by_query needs a source whose queries have their own split (BeirSource); {raw.name} has none"
            )
        min_interactions = 1 if self.split_kind == "by_query" else self.min_interactions
        store = build_sequences(raw, min_interactions, self.drop_consecutive_repeats)
        log.info(
            "%s: %d users, %d items, %d interactions (%d users with < %d interactions dropped)",
            raw.name, store.num_users, store.num_items, store.num_interactions,
            store.num_dropped_users, min_interactions,
        )
        return store

    @cached_property
    def split(self) -> Split:
        if self.split_kind == "by_query":
            roles = self._raw_log().query_roles
            return query_split(self.store, np.array([roles[raw] for raw in self.store.user_raw_ids.tolist()]))
        if self.split_kind == "leave_one_out":
            return leave_one_out_split(self.store)
        return temporal_split(self.store, self.val_fraction, self.test_fraction)

    @cached_property
    def cold_items(self) -> np.ndarray | None:
        """(N + 1,) mask of the cold-start items held out of training ([0], padding, is not one); None without
        ``cold_item_fraction``. Drawn within popularity strata of the items' event counts over the whole log."""
        if not self.cold_item_fraction:
            return None
        counts = np.bincount(self.store.items, minlength=self.num_items + 1)
        cold = draw_cold_items(counts, self.cold_item_fraction, self.cold_item_strata, self.cold_item_seed or 0)
        if not cold.any():
            raise ConfigError(
                f"--data.cold_item_fraction={self.cold_item_fraction} holds out no item of {self.num_items} in "
                f"{self.cold_item_strata} strata; raise it or lower --data.cold_item_strata"
            )
        return cold

    @property
    def cold_item_ids(self) -> np.ndarray | None:
        """(C,) ids of the cold-start items, ascending; None without a cold split."""
        return None if self.cold_items is None else np.flatnonzero(self.cold_items)

    @property
    def training_item_ids(self) -> np.ndarray | None:
        """(W,) ids of the items training may see (inputs, targets, negatives), ascending: every item but the
        cold ones; None (every item) without a cold split."""
        return None if self.cold_items is None else np.flatnonzero(~self.cold_items[1:]) + 1

    @cached_property
    def _warm_events(self) -> tuple[SequenceStore, np.ndarray | None]:
        """The events training and query histories read (the store, or without every cold item's event; with the
        actions the query encoder is shown, ``history_actions``), and for each position of the store its position
        there (None: the same positions)."""
        shown = self.store if self.history_actions is self.store.actions else dataclasses.replace(self.store, actions=self.history_actions)
        if self.cold_items is None:
            return shown, None
        return without_items(shown, self.cold_items)

    def _warm_ends(self, ends: np.ndarray) -> np.ndarray:
        """Ends of prefixes of the users' sequences in the store -> the same prefixes' ends in ``_warm_events``."""
        _, position = self._warm_events
        return ends if position is None else position[ends]

    @property
    def num_items(self) -> int:
        return self.store.num_items

    @property
    def num_users(self) -> int:
        return self.store.num_users

    @cached_property
    def item_titles(self) -> list[str]:
        """Title of every contiguous item id (index 0 is padding)."""
        titles = (self._raw_log().item_titles or {})
        return ["<pad>"] + [titles.get(r, f"item {r}") for r in self.store.item_raw_ids[1:].tolist()]

    @cached_property
    def query_texts(self) -> list[str] | None:
        """The text of every contiguous user index (a text query's words), or None when the source's users are
        not text queries."""
        texts = self._raw_log().query_texts
        if texts is None:
            return None
        return [texts.get(raw, "") for raw in self.store.user_raw_ids.tolist()]

    @cached_property
    def item_clusters(self) -> np.ndarray | None:
        """Cluster / label of every item id for plots (synthetic: the cluster), else None."""
        clusters = self._raw_log().item_clusters
        if clusters is None:
            return None
        if isinstance(clusters, np.ndarray):  # indexed by raw id
            return np.concatenate([[-1], clusters[self.store.item_raw_ids[1:]]])
        return np.array([-1] + [clusters[r] for r in self.store.item_raw_ids[1:].tolist()])

    @cached_property
    def item_content(self) -> ItemContent | None:
        """The source's item content aligned with the contiguous item ids (row 0: padding, empty), or None
        when the source has none. Items without a metadata row get empty content, counted in a warning."""
        content = self._raw_log().item_content
        if content is None:
            return None
        aligned, missing = content.aligned(self.store.item_raw_ids)
        num_missing = int(missing[1:].sum())  # row 0 is padding
        if num_missing:
            log.warning(
                "%s: %d of %d items have no row in the item table; they get empty content",
                self._raw_log().name, num_missing, self.num_items,
            )
        return aligned

    @property
    def action_names(self) -> tuple[str, ...]:
        """The action types the events carry (``rails_lightning.data.actions``), () when the source has none."""
        return self.store.action_names

    @cached_property
    def history_actions(self) -> np.ndarray | None:
        """(M,) the action bitmasks the query encoder is shown, aligned with the store's events: the logged ones,
        or with ``shuffle_history_actions`` the same masks permuted across all events; None without actions."""
        actions = self.store.actions
        if not self.shuffle_history_actions:
            return actions
        if actions is None:
            raise ConfigError(f"--data.shuffle_history_actions: {self._raw_log().name} has no action types to shuffle")
        return actions[np.random.default_rng(self.action_shuffle_seed).permutation(len(actions))]

    @cached_property
    def target_group_names(self) -> tuple[str, ...]:
        """The groups of targets reported apart: the ``target_groups`` (checked against what the data offers),
        then, under a cold split, ``cold`` and ``warm`` (the targets that are, or are not, cold-start items)."""
        unknown = [name for name in self.target_groups if name not in self.action_names]
        if unknown:
            offered = f"its action types {list(self.action_names)}" if self.action_names else "no action types"
            raise ConfigError(f"--data.target_groups={unknown[0]!r} is not a group of {self._raw_log().name}, which has {offered}")
        if self.cold_items is None:
            return self.target_groups
        taken = [name for name in self.target_groups if name in COLD_GROUPS + ("cold_only",)]
        if taken:
            raise ConfigError(f"--data.target_groups={taken[0]!r} names a group of the cold split's metrics; a cold split reports it itself")
        return self.target_groups + COLD_GROUPS

    def target_group_bits(self, targets: np.ndarray, target_actions: np.ndarray | None) -> np.ndarray:
        """(B, T) target ids (0: padding) and their events' action bitmasks -> (B, T) bitmasks over
        ``target_group_names`` (bit g set: the target is in group g)."""
        bits = np.zeros(targets.shape, dtype=np.int64)
        for g, name in enumerate(self.target_group_names):
            if name in COLD_GROUPS:
                member = self.cold_items[targets] == (name == "cold")  # (B, T)
            else:
                member = (target_actions >> self.action_names.index(name)) & 1  # an action type's events
            bits |= member.astype(np.int64) << g
        return np.where(targets > 0, bits, 0)

    @cached_property
    def genre_names(self) -> list[str]:
        genres = self._raw_log().item_genres or {}
        return sorted({g for gs in genres.values() for g in gs})

    @cached_property
    def item_features(self) -> torch.Tensor | None:
        """(N + 1, G) multi-hot genres, or None when disabled or the source has none."""
        if not self.use_item_features or not self.genre_names:
            return None
        genres = self._raw_log().item_genres or {}
        column = {g: j for j, g in enumerate(self.genre_names)}
        features = torch.zeros(self.num_items + 1, len(column))
        for item, raw in enumerate(self.store.item_raw_ids[1:].tolist(), start=1):
            for g in genres.get(raw, []):
                features[item, column[g]] = 1.0
        return features

    @property
    def num_item_features(self) -> int:
        features = self.item_features
        return 0 if features is None else features.shape[1]

    def _raw_log(self):
        self.store  # noqa: B018 - loads the source
        return self._raw

    @cached_property
    def train_item_counts(self) -> np.ndarray:
        """(N + 1,) how often each item occurs in the training part (popularity; 0 for a cold item)."""
        events, _ = self._warm_events
        _, train_items = gather_ranges(events.items, events.offsets[:-1], self._warm_ends(self.split.train_end))
        return np.bincount(train_items, minlength=self.num_items + 1)

    def summary(self) -> dict[str, float | int | str]:
        lengths = self.store.lengths
        facts = {
            "dataset": self._raw_log().name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.store.num_interactions,
            "dropped_users": self.store.num_dropped_users,
            "mean_sequence_length": float(lengths.mean()),
            "val_queries": len(self.split.val),
            "test_queries": len(self.split.test),
            **({"query_split": self._raw_log().query_split_description} if self.split_kind == "by_query" else {}),
        }
        if self.cold_items is not None:
            facts |= {
                "cold_items": int(self.cold_items.sum()),
                "cold_item_seed": self.cold_item_seed or 0,
                "cold_item_fraction": self.cold_item_fraction,
                "cold_item_strata": self.cold_item_strata,
                "cold_events_left_out_of_training": int(self.store.num_interactions - self._warm_events[0].num_interactions),
            }
            for stage, queries in (("val", self.split.val), ("test", self.split.test)):
                _, targets = gather_ranges(self.store.items, queries.history_end, queries.target_end)
                rows = np.repeat(np.arange(len(queries)), queries.target_end - queries.history_end)
                facts[f"{stage}_queries_with_a_cold_target"] = len(np.unique(rows[self.cold_items[targets]]))
        return facts

    def setup(self, stage: str | None = None) -> None:
        """Builds the split once and refuses an empty one (or an unknown target group) before any training or evaluation starts."""
        self.target_group_names, self.history_actions  # noqa: B018 - checks the groups and the shuffle
        split = self.split
        how = f"split={self.split_kind}" + (
            f", val_fraction={self.val_fraction}, test_fraction={self.test_fraction}" if self.split_kind == "temporal" else ""
        )
        if stage in (None, "fit") and len(self._train_dataset()) == 0:
            if self.split_kind == "by_query":
                raise DataError(f"{self._raw_log().name}: the training split is empty ({how}): no training query has a relevant item")
            raise DataError(
                f"{self._raw_log().name}: the training split is empty ({how}): no user has 2 training interactions; "
                "use more data, a larger --data.min_interactions, or a smaller validation/test period"
            )
        for name, queries in (("validation", split.val), ("test", split.test)):
            wanted = {"validation": (None, "fit", "validate"), "test": (None, "test", "predict")}[name]
            if stage in wanted and len(queries) == 0:
                fix = f"raise --data.{'val' if name == 'validation' else 'test'}_fraction" if self.split_kind == "temporal" else "use more data"
                if self.split_kind == "by_query":
                    fix = "give the source queries of that role (BeirSource: qrels/dev.tsv or val_fraction > 0; qrels/test.tsv)"
                raise DataError(f"{self._raw_log().name}: the {name} split is empty ({how}); {fix}")

    def visible_item_counts(self, stage: str) -> np.ndarray:
        """(N + 1,) item counts over what the model sees at ``stage`` ("val" or "test"): every training
        item, plus, for the users queried at that stage, their history up to the query (at test time
        in leave-one-out, the validation item too); under a cold split, the warm items' events only."""
        queries = self.split.val if stage == "val" else self.split.test
        ends = self.split.train_end.copy()
        ends[queries.users] = np.maximum(ends[queries.users], queries.history_end)
        events, _ = self._warm_events
        _, items = gather_ranges(events.items, events.offsets[:-1], self._warm_ends(ends))
        return np.bincount(items, minlength=self.num_items + 1)

    def _train_dataset(self) -> Dataset:
        if self.split_kind == "by_query":
            return _TrainPairs(self.store, self.split.train_end)
        events, _ = self._warm_events
        return _TrainSequences(events, self._warm_ends(self.split.train_end), self.max_seq_len)

    def train_dataloader(self) -> DataLoader:
        dataset = self._train_dataset()
        return _batched_loader(dataset, self.batch_size, shuffle=True, num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self.query_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.query_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.query_loader("test")

    def query_loader(self, stage: str, sharded: bool = True) -> DataLoader:
        """The "val" or "test" queries; under DDP (``sharded``) only this process's slice of them."""
        queries = self.split.val if stage == "val" else self.split.test
        events, _ = self._warm_events
        dataset = _Queries(
            self.store, queries, self.max_seq_len, events, self._warm_ends(queries.history_end),
            self.target_group_bits if self.target_group_names else None,
        )
        trainer = self.trainer if sharded else None
        return _batched_loader(dataset, self.eval_batch_size, shuffle=False, num_workers=self.num_workers, trainer=trainer)
