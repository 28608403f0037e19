"""Typed batches. Shapes: B batch, L max sequence length, T targets per query, E excluded items."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rails_lightning.retrieval.topk import Exclusion


@dataclass
class TrainBatch:
    """Autoregressive training: at every position the next item is the target. (A source of text queries
    trains one (query, relevant item) pair per row: ``input_ids`` (B, 1) zeros, ``target_ids`` (B, 1) the item.)"""

    user_ids: Tensor  # (B,) int64
    input_ids: Tensor  # (B, L) int64, left-padded with 0
    target_ids: Tensor  # (B, L) int64, 0 where there is no target
    # Seconds of each input item, aligned with input_ids (0 at padding); None when the source has no timestamps.
    timestamps: Tensor | None = None  # (B, L) int64
    # What each input event was: action-type bitmasks aligned with input_ids (0 at padding); None without actions.
    # A target's own actions are never here: position t holds the actions of input item t, not of its target.
    actions: Tensor | None = None  # (B, L) int64


@dataclass
class QueryBatch:
    """Evaluation queries: the last L history items, the targets, and the full history to exclude."""

    user_ids: Tensor  # (B,) int64
    input_ids: Tensor  # (B, L) int64, left-padded with 0
    targets: Tensor  # (B, T) int64, padded with 0
    exclude_offsets: Tensor  # (B + 1,) int64: query i excludes exclude_items[offsets[i]:offsets[i+1]]
    exclude_items: Tensor  # (E,) int64
    # Seconds of each history item, aligned with input_ids (0 at padding); None when the source has no timestamps.
    timestamps: Tensor | None = None  # (B, L) int64
    # Action-type bitmasks of the history events, aligned with input_ids (0 at padding); None without actions.
    actions: Tensor | None = None  # (B, L) int64
    # Which of the DataModule's target groups (``target_group_names``) each target belongs to, as a bitmask
    # aligned with targets (bit g: group g); None when no group is reported. Evaluation only: no model reads it.
    target_groups: Tensor | None = None  # (B, T) int64
    # Graded relevance of each target, aligned with targets (0 at padding); None when every target counts the same.
    target_gains: Tensor | None = None  # (B, T) float32

    @property
    def exclusion(self) -> Exclusion:
        """The items each query must not get back (its history), as retrievers take them."""
        return Exclusion(self.exclude_offsets, self.exclude_items)
