"""Checks of columns read from interaction files, shared by the file-based sources.

Each check takes a whole column as an array and either returns it converted or raises a
``DataError`` naming the file, the first bad line (or row) and what was expected there.
"""

from __future__ import annotations

import numpy as np

from rails_lightning.errors import DataError


def check_columns(path: str, available: list[str], wanted: list[str]) -> None:
    """Raise when a wanted column is absent, listing the columns the file has."""
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {available}")


def row_location(path: str, row: int, header_lines: int | None) -> str:
    """``file, line N`` for text files (``header_lines`` lines above the first row), ``file, row N`` otherwise."""
    if header_lines is None:
        return f"{path}, row {row + 1}"
    return f"{path}, line {row + 1 + header_lines}"


def integer_column(path: str, name: str, values: np.ndarray, header_lines: int | None = 1) -> np.ndarray:
    """Return ``values`` as int64 or raise naming the first offending line."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    as_text = values.astype(str)
    if values.dtype.kind == "f":
        ok = np.isfinite(values) & (values == np.round(values))
    else:
        # Digits with at most one leading minus sign.
        negative = np.char.startswith(as_text, "-")
        ok = np.char.isdigit(np.where(negative, np.char.replace(as_text, "-", "", count=1), as_text))
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(
            f"{row_location(path, row, header_lines)}: column '{name}' must hold integers, found {str(as_text[row])!r}"
        )
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError) as err:
        raise DataError(f"{path}: column '{name}' holds integers that do not fit in int64 ({err})") from err


def id_column(path: str, name: str, values: np.ndarray, header_lines: int | None = 1) -> np.ndarray:
    """User / item ids: integers as int64, text ids (``A9GJTPHWWG9KQ``) as strings; ids are remapped to
    contiguous indices later, so any label works. Numbers with a fraction are refused (a wrong column)."""
    if values.dtype.kind in "iuf":
        return integer_column(path, name, values, header_lines)
    text = values.astype(str)
    negative = np.char.startswith(text, "-")
    if np.char.isdigit(np.where(negative, np.char.replace(text, "-", "", count=1), text)).all():
        return integer_column(path, name, text, header_lines)
    empty = np.char.str_len(np.char.strip(text)) == 0
    if empty.any():
        raise DataError(f"{row_location(path, int(np.flatnonzero(empty)[0]), header_lines)}: column '{name}' is empty")
    return text


def order_column(path: str, name: str, values: np.ndarray, header_lines: int | None = 1) -> np.ndarray:
    """Numbers as they are; timestamps (datetime values or ISO 8601 strings) as int64 seconds."""
    if values.dtype.kind in "iuf":
        if values.dtype.kind == "f" and np.isnan(values).any():
            row = int(np.flatnonzero(np.isnan(values))[0])
            raise DataError(f"{row_location(path, row, header_lines)}: column '{name}' is empty")
        return values
    if values.dtype.kind == "M":
        return values.astype("datetime64[s]").astype(np.int64)
    import pandas as pd

    text = pd.Series(values.astype(str))
    numbers = pd.to_numeric(text, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy()
    times = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    if times.notna().all():
        return times.dt.tz_convert(None).to_numpy().astype("datetime64[s]").astype(np.int64)
    # Report the first value that fits neither reading the column mostly has.
    bad = (numbers if numbers.notna().sum() > times.notna().sum() else times).isna().to_numpy()
    row = int(np.flatnonzero(bad)[0])
    raise DataError(
        f"{row_location(path, row, header_lines)}: column '{name}' must be a number or an ISO 8601 timestamp, "
        f"found {str(text[row])!r}"
    )


def number_column(path: str, name: str, column, header_lines: int, allow_missing: bool = False) -> np.ndarray:
    """A pandas column as float64; anything that is not a number (or empty, unless allowed) is an error."""
    import pandas as pd

    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(numbers)
    if allow_missing:
        bad &= column.notna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{row_location(path, row, header_lines)}: column '{name}' must be a number, "
            f"found {str(column.iloc[row])!r}"
        )
    return numbers
