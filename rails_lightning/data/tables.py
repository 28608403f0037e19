"""Reading a table file (csv, parquet, json lines; a glob of them) into whole numpy columns.

One reader for every file-based source: the matching Hugging Face ``datasets`` builder, cached by the
files' content. Failures are one-line ``DataError``s naming the file; the column checks in ``columns``
then name the line (row for parquet) of a bad value.
"""

from __future__ import annotations

import glob
import hashlib
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rails_lightning.data.columns import check_columns
from rails_lightning.errors import DataError

if TYPE_CHECKING:
    import datasets

# Lines above the first row: the csv header; json lines has none; parquet has rows, not lines.
_HEADER_LINES = {"csv": 1, "json": 0, "parquet": None}


def table_format(path: str, file_format: str = "auto") -> str:
    """``csv``, ``parquet`` or ``json``: ``file_format`` unless ``auto``, else guessed from the file name."""
    if file_format != "auto":
        return file_format
    name = path.lower().removesuffix(".gz").removesuffix(".bz2")
    for ext, fmt in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".tsv", "csv")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: cannot tell the file format from the name; set file_format")


def _fingerprint(path: str) -> str:
    """BLAKE2 digest of the content of every file the path names (a glob: all of them, in order)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(glob.glob(path)) or [path]:
        with open(name, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _build(path: str, fmt: str, options: dict[str, Any], text_columns: Sequence[str], as_text: bool = False) -> datasets.Dataset:
    """Build the file(s) with the ``datasets`` builder of ``fmt``; reader failures become DataError.

    ``as_text`` reads ``text_columns`` of a csv as text rather than letting pandas type them.
    """
    import datasets
    import pyarrow as pa

    if as_text:
        options = {**options, "converters": dict.fromkeys(text_columns, str)}
    datasets.disable_progress_bars()
    try:
        # The cache is keyed by the files' content: a rewritten file is never served from a stale copy.
        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "rails_lightning" / _fingerprint(path)
        builder = datasets.load_dataset_builder(fmt, data_files=path, cache_dir=str(cache_dir), **options)
        builder.download_and_prepare()
    except Exception as err:  # datasets wraps the reader's errors in its own exception types
        cause = err.__cause__ or err
        # Any failure to read a parquet file means a damaged file (its schema is in the footer).
        if fmt == "parquet" or isinstance(cause, (EOFError, OSError, zlib.error, zipfile.BadZipFile)):
            raise DataError(f"{path}: unreadable, truncated or corrupt file ({type(cause).__name__}: {cause})") from err
        # pandas types each block of csv rows on its own, and a block that does not fit the
        # type of the first one fails the cast without a line number. Read the wanted columns
        # as text instead: the column checks then name the line of the bad value (only for a
        # single file: rows of a glob are numbered across its files).
        if fmt == "csv" and not as_text and isinstance(cause, pa.ArrowInvalid) and Path(path).is_file():
            return _build(path, fmt, options, text_columns, as_text=True)
        raise DataError(f"{path}: could not be parsed as {fmt} ({type(cause).__name__}: {cause})") from err
    # A header-only file builds fine and empty: its row count says so, not the reader's error text.
    if builder.info.splits["train"].num_examples == 0:
        raise DataError(f"{path}: the file has no rows")
    return builder.as_dataset(split="train")


def read_table(
    path: str, wanted: Sequence[str], file_format: str = "auto", delimiter: str = "auto", text_columns: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], int | None]:
    """The ``wanted`` columns of a csv / parquet / json-lines file (or glob) as whole numpy arrays, read with
    ``datasets``, and the number of lines above the first row (for error locations; None for parquet).

    One-line ``DataError`` for a missing, empty, unreadable file or a missing column (listing those the file
    has). ``text_columns`` are read as text if pandas cannot type a csv consistently.
    """
    # glob.glob, not Path().glob: the latter refuses absolute patterns.
    if not Path(path).exists() and not glob.glob(path):
        raise DataError(f"{path}: file not found")
    fmt = table_format(path, file_format)
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    options = {}
    if fmt == "csv":
        tab = ".tsv" in path.lower()
        options["sep"] = delimiter if delimiter != "auto" else ("\t" if tab else ",")
    table = _build(path, fmt, options, text_columns)
    check_columns(path, table.column_names, list(wanted))
    arrow = table.with_format("arrow")[:]  # whole Arrow columns, never per-row Python access
    return {c: arrow.column(c).to_numpy(zero_copy_only=False) for c in wanted}, _HEADER_LINES[fmt]


def missing_values(values: np.ndarray) -> np.ndarray:
    """(n,) True where a column read from a file has no value (None, or NaN in a float column)."""
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.array([v is None for v in values.tolist()], dtype=bool)
    return np.zeros(len(values), dtype=bool)
