"""The one LightningDataModule of user-item interactions that every model shares."""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Literal

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
    gather_ranges,
    last_window,
    leave_one_out_split,
    query_split,
    temporal_split,
    without_targets,
)
from rails_lightning.data.source import InteractionSource
from rails_lightning.data.synthetic import SyntheticSource
from rails_lightning.errors import ConfigError

log = logging.getLogger(__name__)


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
    def __init__(self, store: SequenceStore, queries: QuerySet, max_seq_len: int) -> None:
        self.store, self.queries, self.length = store, queries, max_seq_len
        self.max_targets = queries.max_targets

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: list[int]) -> QueryBatch:
        q, index = self.queries, np.asarray(index)
        users, history_end, target_end = q.users[index], q.history_end[index], q.target_end[index]
        starts = self.store.offsets[users]
        inputs = last_window(self.store.items, starts, history_end, self.length)  # (B, L)
        # Targets right after the history, padded to T columns.
        targets = last_window(self.store.items, history_end, target_end, self.max_targets)  # (B, T)
        exclude_offsets, exclude_items = gather_ranges(self.store.items, starts, history_end)
        # The history is excluded from the ranking, but never the query's own target(s).
        exclude_offsets, exclude_items = without_targets(exclude_offsets, exclude_items, targets, self.store.num_items)
        # The history's times and actions, aligned with inputs.
        timestamps, actions = (
            None if values is None else torch.from_numpy(last_window(values, starts, history_end, self.length))
            for values in (self.store.timestamps, self.store.actions)
        )
        gains = None
        if self.store.relevance is not None:  # each target's graded relevance, aligned with targets
            gains = torch.from_numpy(last_window(self.store.relevance, history_end, target_end, self.max_targets)).float()
        return QueryBatch(
            user_ids=torch.from_numpy(users),
            input_ids=torch.from_numpy(inputs),
            targets=torch.from_numpy(targets),
            exclude_offsets=torch.from_numpy(exclude_offsets),
            exclude_items=torch.from_numpy(exclude_items),
            timestamps=timestamps,
            actions=actions,
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
        drop_consecutive_repeats: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source = source if source is not None else SyntheticSource()
        self.max_seq_len = max_seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.min_interactions = min_interactions
        self.split_kind = split
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.use_item_features = use_item_features
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
        """(N + 1,) how often each item occurs in the training part (popularity)."""
        starts = self.store.offsets[:-1]
        _, train_items = gather_ranges(self.store.items, starts, self.split.train_end)
        return np.bincount(train_items, minlength=self.num_items + 1)

    def summary(self) -> dict[str, float | int | str]:
        lengths = self.store.lengths
        return {
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

    def setup(self, stage: str | None = None) -> None:
        """Builds the split once and refuses an empty one before any training or evaluation starts."""
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
        in leave-one-out, the validation item too)."""
        queries = self.split.val if stage == "val" else self.split.test
        ends = self.split.train_end.copy()
        ends[queries.users] = np.maximum(ends[queries.users], queries.history_end)
        _, items = gather_ranges(self.store.items, self.store.offsets[:-1], ends)
        return np.bincount(items, minlength=self.num_items + 1)

    def _train_dataset(self) -> Dataset:
        if self.split_kind == "by_query":
            return _TrainPairs(self.store, self.split.train_end)
        return _TrainSequences(self.store, self.split.train_end, self.max_seq_len)

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
        dataset = _Queries(self.store, queries, self.max_seq_len)
        trainer = self.trainer if sharded else None
        return _batched_loader(dataset, self.eval_batch_size, shuffle=False, num_workers=self.num_workers, trainer=trainer)
