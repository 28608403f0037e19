"""What each event was: action types as data.

An event may carry several action types at once (a like and a repost; a rating that is both "rated" and
"loved"). They are kept as one int64 bitmask per event over a list of action names: bit ``a`` set means
the event is of type ``action_names[a]`` (at most ``MAX_ACTION_TYPES`` types). Batches carry the masks of
the history positions; the query encoders turn them into multi-hot vectors.

Sources of action types:

* columns of a log (``actions_from_columns``): a 0/1 (or true/false) column is one action type named after
  the column; a list column (parquet, json lines) or a text column (values joined by a separator, e.g.
  ``like|reply``) gives one action type per distinct value;
* a rating (``actions_from_ratings``), by the rule ``RATING_ACTIONS``: rated (every rating), liked (>= 4),
  loved (= 5), disliked (<= 2) — on MovieLens' 1-5 stars.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from rails_lightning.data.columns import row_location
from rails_lightning.errors import DataError

MAX_ACTION_TYPES = 62  # bits of a non-negative int64
RATING_ACTIONS = ("rated", "liked", "loved", "disliked")


def actions_from_ratings(ratings: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(M,) ratings on a 1-5 scale -> (M,) bitmasks over ``RATING_ACTIONS``: rated always, liked >= 4,
    loved == 5, disliked <= 2."""
    flags = [np.ones(len(ratings), bool), ratings >= 4, ratings == 5, ratings <= 2]
    return pack(np.stack(flags, axis=1)), RATING_ACTIONS


def pack(flags: np.ndarray) -> np.ndarray:
    """(M, A) booleans -> (M,) int64 bitmasks."""
    return (flags.astype(np.int64) << np.arange(flags.shape[1], dtype=np.int64)).sum(axis=1)


def unpack(masks: np.ndarray, num_types: int) -> np.ndarray:
    """(...,) int64 bitmasks -> (..., A) booleans."""
    return (masks[..., None] >> np.arange(num_types, dtype=np.int64)) & 1 == 1


def actions_from_columns(
    path: str, columns: Mapping[str, np.ndarray], header: int | None, separator: str = "|"
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Columns of a log (name -> (M,) values, as read) -> (M,) bitmasks and the action names, in column order
    (a multi-valued column's values sorted). Raises a one-line ``DataError`` naming the file, the line and
    what was expected for a value that fits neither reading of its column."""
    names: list[str] = []
    flags: list[np.ndarray] = []
    for column, values in columns.items():
        flag = _flag_column(values)
        if flag is not None:
            names.append(column)
            flags.append(flag)
            continue
        if values.dtype.kind in "iuf":  # numbers, but not all 0/1: name the first that is not
            row = int(np.flatnonzero(~np.isin(values, (0, 1)) & ~np.isnan(values.astype(float)))[0])
            raise DataError(
                f"{row_location(path, row, header)}: action column '{column}' must hold 0/1 flags, found {values[row].item()!r}"
            )
        per_event = [_values(path, column, row, value, separator, header) for row, value in enumerate(values.tolist())]
        vocabulary = sorted({v for vs in per_event for v in vs})
        names += vocabulary
        index = {v: j for j, v in enumerate(vocabulary)}
        multi_hot = np.zeros((len(values), len(vocabulary)), bool)
        for row, vs in enumerate(per_event):
            multi_hot[row, [index[v] for v in vs]] = True
        flags += list(multi_hot.T)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: action type(s) {repeated} come from more than one action column; rename the values or the columns")
    if len(names) > MAX_ACTION_TYPES:
        raise DataError(f"{path}: {len(names)} action types in {list(columns)}, at most {MAX_ACTION_TYPES} are supported")
    return pack(np.stack(flags, axis=1) if flags else np.zeros((0, 0), bool)), tuple(names)


def _flag_column(values: np.ndarray) -> np.ndarray | None:
    """A 0/1 or boolean column as (M,) booleans, or None when the column is something else."""
    if values.dtype == bool:
        return values
    if values.dtype.kind in "iuf":
        finite = values[~np.isnan(values)] if values.dtype.kind == "f" else values
        if np.isin(finite, (0, 1)).all():
            return np.nan_to_num(values.astype(float)) == 1
        return None
    return None


def _values(path: str, column: str, row: int, value, separator: str, header: int | None) -> list[str]:
    """The action types of one event of a list or text column."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(v) for v in value if v is not None]
    elif isinstance(value, str):
        items = [part.strip() for part in value.split(separator)]
    else:
        raise DataError(
            f"{row_location(path, row, header)}: action column '{column}' must hold 0/1 flags, a list of action "
            f"names or names joined by '{separator}', found {value!r}"
        )
    return [item for item in items if item]
