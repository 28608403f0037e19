"""``InteractionLogSource``: any interaction log in csv, parquet or json lines.

Every file is read by one reader, the matching Hugging Face ``datasets`` builder; the wanted
columns are then checked as whole arrays (``columns``), so a bad value is reported with its
file and line (row for parquet) and what was expected there.
"""

from __future__ import annotations

import glob
import hashlib
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rails_lightning.data.columns import check_columns, id_column, order_column, row_location
from rails_lightning.data.sequences import DataError, InteractionLog
from rails_lightning.data.source import InteractionSource

if TYPE_CHECKING:
    import datasets

# Lines above the first row: the csv header; json lines has none; parquet has rows, not lines.
_HEADER_LINES = {"csv": 1, "json": 0, "parquet": None}


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
    """

    def __init__(
        self,
        path: str,
        user_column: str = "user_id",
        item_column: str = "item_id",
        order_column: str = "timestamp",
        file_format: Literal["auto", "csv", "parquet", "json"] = "auto",
        delimiter: str = "auto",
    ) -> None:
        self.path = str(path)
        self.user_column, self.item_column, self.order_column = user_column, item_column, order_column
        self.file_format = file_format
        self.delimiter = delimiter

    @property
    def description(self) -> str:
        return self.path

    def _format(self) -> str:
        if self.file_format != "auto":
            return self.file_format
        name = self.path.lower().removesuffix(".gz").removesuffix(".bz2")
        for ext, fmt in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".tsv", "csv")):
            if name.endswith(ext):
                return fmt
        raise DataError(f"{self.path}: cannot tell the file format from the name; set file_format")

    def _fingerprint(self) -> str:
        """BLAKE2 digest of the content of every file the path names (a glob: all of them, in order)."""
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(glob.glob(self.path)) or [self.path]:
            with open(name, "rb") as file:
                while chunk := file.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()

    def _read(self, fmt: str, options: dict[str, Any], as_text: bool = False) -> datasets.Dataset:
        """Build the file(s) with the ``datasets`` builder of ``fmt``; reader failures become DataError.

        ``as_text`` reads the wanted csv columns as text rather than letting pandas type them.
        """
        import datasets
        import pyarrow as pa

        if as_text:
            wanted = (self.user_column, self.item_column, self.order_column)
            options = {**options, "converters": dict.fromkeys(wanted, str)}
        datasets.disable_progress_bars()
        try:
            # The cache is keyed by the files' content: a rewritten log is never served from a stale copy.
            cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "rails_lightning" / self._fingerprint()
            builder = datasets.load_dataset_builder(fmt, data_files=self.path, cache_dir=str(cache_dir), **options)
            builder.download_and_prepare()
        except Exception as err:  # datasets wraps the reader's errors in its own exception types
            cause = err.__cause__ or err
            # Any failure to read a parquet file means a damaged file (its schema is in the footer).
            if fmt == "parquet" or isinstance(cause, (EOFError, OSError, zlib.error, zipfile.BadZipFile)):
                raise DataError(
                    f"{self.path}: unreadable, truncated or corrupt file ({type(cause).__name__}: {cause})"
                ) from err
            # pandas types each block of csv rows on its own, and a block that does not fit the
            # type of the first one fails the cast without a line number. Read the wanted columns
            # as text instead: the column checks then name the line of the bad value (only for a
            # single file: rows of a glob are numbered across its files).
            if fmt == "csv" and not as_text and isinstance(cause, pa.ArrowInvalid) and Path(self.path).is_file():
                return self._read(fmt, options, as_text=True)
            raise DataError(f"{self.path}: could not be parsed as {fmt} ({type(cause).__name__}: {cause})") from err
        # A header-only file builds fine and empty: its row count says so, not the reader's error text.
        if builder.info.splits["train"].num_examples == 0:
            raise DataError(f"{self.path}: the file has no rows")
        return builder.as_dataset(split="train")

    def load(self) -> InteractionLog:
        # glob.glob, not Path().glob: the latter refuses absolute patterns.
        if not Path(self.path).exists() and not glob.glob(self.path):
            raise DataError(f"{self.path}: file not found")
        fmt = self._format()
        if Path(self.path).is_file() and Path(self.path).stat().st_size == 0:
            raise DataError(f"{self.path}: the file is empty")
        options = {}
        if fmt == "csv":
            tab = ".tsv" in self.path.lower()
            options["sep"] = self.delimiter if self.delimiter != "auto" else ("\t" if tab else ",")
        table = self._read(fmt, options)
        wanted = [self.user_column, self.item_column, self.order_column]
        check_columns(self.path, table.column_names, wanted)
        header = _HEADER_LINES[fmt]
        # Whole Arrow columns, never per-row Python access.
        arrow = table.with_format("arrow")[:]
        for c in wanted:
            if arrow.column(c).null_count:
                row = int(arrow.column(c).is_null().to_numpy(zero_copy_only=False).argmax())
                raise DataError(f"{row_location(self.path, row, header)}: column '{c}' is empty")
        columns = {c: arrow.column(c).to_numpy(zero_copy_only=False) for c in wanted}
        order = order_column(self.path, self.order_column, columns[self.order_column], header)
        return InteractionLog(
            user_ids=id_column(self.path, self.user_column, columns[self.user_column], header),
            item_ids=id_column(self.path, self.item_column, columns[self.item_column], header),
            order=order,
            timestamps=order,
            name=self.path,
        )
