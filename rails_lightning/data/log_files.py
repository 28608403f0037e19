"""``InteractionLogSource``: any interaction log in csv, parquet or json lines, optionally with an item table.

Every file is read by one reader (``read_table``), the matching Hugging Face ``datasets`` builder; the
wanted columns are then checked as whole arrays (``columns``), so a bad value is reported with its file
and line (row for parquet) and what was expected there.
"""

from __future__ import annotations

from typing import Literal, Sequence

from rails_lightning.data.actions import actions_from_columns
from rails_lightning.data.columns import id_column, order_column, row_location
from rails_lightning.data.item_content import ItemTable
from rails_lightning.data.sequences import InteractionLog
from rails_lightning.data.source import InteractionSource
from rails_lightning.data.tables import missing_values, read_table
from rails_lightning.errors import DataError

class InteractionLogSource(InteractionSource):
    """Any interaction log in csv, parquet or json lines, read with Hugging Face ``datasets``.

    Args:
        path: the file (or a glob of files) to read.
        user_column: column with integer user ids.
        item_column: column with integer item ids.
        order_column: column that orders each user's events: a number (timestamp or position) or a
            date-time (ISO 8601 text such as ``2001-01-02 10:00:00``, read as UTC seconds). Ties keep
            the file order. Also used as the global clock of the temporal split.
        file_format: ``auto`` guesses from the extension (.csv, .tsv, .parquet, .json, .jsonl, .gz).
        delimiter: csv delimiter (``auto``: tab for .tsv, comma otherwise).
        items: a table describing the items (text, categorical and numeric columns), joined on the
            item id; items of the log without a row get empty content (counted in a warning).
        action_columns: columns that say what each event was (``rails_lightning.data.actions``): a 0/1 column
            is one action type named after it; a list column, or text with names joined by
            ``action_separator`` (``like|reply``), gives one action type per distinct name. () for none.
        action_separator: what joins the action names of an event in a text action column.
    """

    def __init__(
        self,
        path: str,
        user_column: str = "user_id",
        item_column: str = "item_id",
        order_column: str = "timestamp",
        file_format: Literal["auto", "csv", "parquet", "json"] = "auto",
        delimiter: str = "auto",
        items: ItemTable | None = None,
        action_columns: Sequence[str] = (),
        action_separator: str = "|",
    ) -> None:
        self.path = str(path)
        self.user_column, self.item_column, self.order_column = user_column, item_column, order_column
        self.file_format = file_format
        self.delimiter = delimiter
        self.items = items
        self.action_columns, self.action_separator = list(action_columns), action_separator

    @property
    def description(self) -> str:
        return self.path

    def load(self) -> InteractionLog:
        wanted = [self.user_column, self.item_column, self.order_column]
        columns, header = read_table(
            self.path, [*wanted, *self.action_columns], self.file_format, self.delimiter, text_columns=wanted
        )
        for c in wanted:
            missing = missing_values(columns[c])
            if missing.any():
                raise DataError(f"{row_location(self.path, int(missing.argmax()), header)}: column '{c}' is empty")
        order = order_column(self.path, self.order_column, columns[self.order_column], header)
        content = self.items.load() if self.items is not None else None
        actions, action_names = None, ()
        if self.action_columns:
            actions, action_names = actions_from_columns(
                self.path, {c: columns[c] for c in self.action_columns}, header, self.action_separator
            )
        return InteractionLog(
            user_ids=id_column(self.path, self.user_column, columns[self.user_column], header),
            item_ids=id_column(self.path, self.item_column, columns[self.item_column], header),
            order=order,
            timestamps=order,
            name=self.path,
            item_titles=content.titles() if content is not None else None,
            item_content=content,
            actions=actions,
            action_names=action_names,
        )

