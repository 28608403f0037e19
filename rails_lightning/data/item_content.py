"""What is known about items besides their ids: text, categorical and numeric columns.

``ItemTable`` reads an item table (csv, parquet or json lines, through ``datasets``) into ``ItemContent``:
one row per item, every column aligned with the raw item ids. Sources attach it to their
``InteractionLog``; the DataModule aligns it with the contiguous item ids the model uses, and items
without a row get empty content (empty text, no categories, NaN numbers), never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from rails_lightning.data.columns import id_column, number_column, row_location
from rails_lightning.errors import DataError
from rails_lightning.data.tables import missing_values, read_table


@dataclass
class ItemContent:
    """Item metadata, row ``i`` describing item ``raw_ids[i]``.

    ``text``: column name -> (N,) strings ("" when unknown); ``categorical``: column name -> (N,) tuples of
    values (a multi-valued column such as genres has several; () when unknown); ``numeric``: column name ->
    (N,) float64 (NaN when unknown).
    """

    raw_ids: np.ndarray  # (N,) raw item ids (int64 or text)
    text: dict[str, list[str]] = field(default_factory=dict)
    categorical: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    numeric: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.raw_ids)

    def titles(self) -> dict | None:
        """Raw id -> display title: the ``title`` text column, else the first text column; None without text."""
        if not self.text:
            return None
        column = self.text["title"] if "title" in self.text else next(iter(self.text.values()))
        return dict(zip(self.raw_ids.tolist(), column))

    def aligned(self, raw_ids: np.ndarray) -> tuple[ItemContent, np.ndarray]:
        """The rows of ``raw_ids`` in that order, and a (len(raw_ids),) mask of the ids without a row (their
        content is empty)."""
        row_of = {raw: row for row, raw in enumerate(self.raw_ids.tolist())}
        rows = np.array([row_of.get(raw, -1) for raw in np.asarray(raw_ids).tolist()], dtype=np.int64)
        missing = rows < 0
        return ItemContent(
            raw_ids=np.asarray(raw_ids),
            text={name: ["" if r < 0 else values[r] for r in rows.tolist()] for name, values in self.text.items()},
            categorical={name: [() if r < 0 else values[r] for r in rows.tolist()] for name, values in self.categorical.items()},
            numeric={name: np.where(missing, np.nan, values[np.maximum(rows, 0)]) for name, values in self.numeric.items()},
        ), missing


class ItemTable:
    """An item table joined to an interaction log on the item id: one row per item.

    Args:
        path: the file (csv, parquet or json lines; or a glob of them).
        id_column: the column of item ids, as in the interaction log (integers or text).
        text_columns: free-text columns (titles, descriptions); a missing value is empty text.
        categorical_columns: columns of categories, single or multi-valued: a list (parquet, json lines) or
            text with values joined by ``separator`` (``Comedy|Drama``).
        numeric_columns: number columns (a year, a price); a missing value is NaN.
        separator: what joins the values of a multi-valued categorical column written as text.
        file_format: ``auto`` guesses from the extension (.csv, .tsv, .parquet, .json, .jsonl, .gz).
        delimiter: csv delimiter (``auto``: tab for .tsv, comma otherwise).
    """

    def __init__(
        self,
        path: str,
        id_column: str = "item_id",
        text_columns: Sequence[str] = (),
        categorical_columns: Sequence[str] = (),
        numeric_columns: Sequence[str] = (),
        separator: str = "|",
        file_format: str = "auto",
        delimiter: str = "auto",
    ) -> None:
        self.path = str(path)
        self.id_column = id_column
        self.text_columns, self.categorical_columns = list(text_columns), list(categorical_columns)
        self.numeric_columns = list(numeric_columns)
        self.separator = separator
        self.file_format, self.delimiter = file_format, delimiter
        named = [id_column, *self.text_columns, *self.categorical_columns, *self.numeric_columns]
        repeated = sorted({name for name in named if named.count(name) > 1})
        if repeated:
            raise DataError(f"{self.path}: column(s) {repeated} named twice in the item table's columns")

    def load(self) -> ItemContent:
        wanted = [self.id_column, *self.text_columns, *self.categorical_columns, *self.numeric_columns]
        columns, header = read_table(self.path, wanted, self.file_format, self.delimiter, text_columns=wanted)
        ids = columns[self.id_column]
        missing = missing_values(ids)
        if missing.any():
            raise DataError(f"{row_location(self.path, int(missing.argmax()), header)}: column '{self.id_column}' is empty")
        ids = id_column(self.path, self.id_column, ids, header)
        _refuse_duplicates(self.path, self.id_column, ids, header)
        import pandas as pd

        return ItemContent(
            raw_ids=ids,
            text={name: ["" if v is None else str(v) for v in columns[name].tolist()] for name in self.text_columns},
            categorical={name: [self._categories(v) for v in columns[name].tolist()] for name in self.categorical_columns},
            numeric={
                name: number_column(self.path, name, pd.Series(columns[name]), header, allow_missing=True)
                for name in self.numeric_columns
            },
        )

    def _categories(self, value) -> tuple[str, ...]:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ()
        if isinstance(value, (list, tuple, np.ndarray)):
            return tuple(str(v) for v in value if v is not None and str(v) != "")
        return tuple(part.strip() for part in str(value).split(self.separator) if part.strip())


def _refuse_duplicates(path: str, name: str, ids: np.ndarray, header: int | None) -> None:
    """One row per item: name the first repeated id, where it repeats and where it first appeared."""
    if len(np.unique(ids)) == len(ids):
        return
    seen: dict = {}
    for row, raw in enumerate(ids.tolist()):
        if raw in seen:
            raise DataError(
                f"{row_location(path, row, header)}: item id {raw!r} in column '{name}' appears again (first at "
                f"{row_location(path, seen[raw], header).split(', ', 1)[1]}); an item table has one row per item"
            )
        seen[raw] = row
