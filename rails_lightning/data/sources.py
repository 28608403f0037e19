"""Where interactions come from: synthetic, MovieLens, or any csv / parquet / json-lines log.

A source is chosen in YAML with ``class_path`` and returns an ``InteractionLog``.
Reading files is the only side effect here; downloads land in a cache directory
through a temporary file that is renamed only after its checksum matched, so a
crash or a bad download never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import http.client
import io
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import numpy as np

from rails_lightning.data.sequences import DataError, InteractionLog
from rails_lightning.data.synthetic import generate_interactions

log = logging.getLogger(__name__)


class InteractionSource(ABC):
    """Base class of every source: ``load()`` returns the raw interaction log."""

    @abstractmethod
    def load(self) -> InteractionLog: ...

    @property
    def description(self) -> str:
        return type(self).__name__


class SyntheticSource(InteractionSource):
    """Deterministic synthetic log: users with several interests, items in clusters
    (see ``rails_lightning.data.synthetic``). The default dataset.

    Args:
        num_users: number of users.
        num_items: number of items.
        num_clusters: number of item clusters (interests).
        interests_per_user: distinct clusters each user draws items from.
        mean_sequence_length: mean number of interactions per user.
        stay_probability: chance the next item continues the current interest.
        seed: generator seed; the same seed gives the same log.
    """

    def __init__(
        self,
        num_users: int = 3000,
        num_items: int = 2000,
        num_clusters: int = 40,
        interests_per_user: int = 3,
        mean_sequence_length: int = 30,
        stay_probability: float = 0.7,
        seed: int = 0,
    ) -> None:
        self.kwargs = dict(
            num_users=num_users,
            num_items=num_items,
            num_clusters=num_clusters,
            interests_per_user=interests_per_user,
            mean_sequence_length=mean_sequence_length,
            stay_probability=stay_probability,
            seed=seed,
        )

    @property
    def description(self) -> str:
        return "synthetic(" + ", ".join(f"{k}={v}" for k, v in self.kwargs.items()) + ")"

    def load(self) -> InteractionLog:
        data = generate_interactions(**self.kwargs)
        return InteractionLog(
            user_ids=data.user_ids,
            item_ids=data.item_ids,
            order=data.positions,
            name=self.description,
            item_titles={i: f"item {i} (cluster {c})" for i, c in enumerate(data.item_cluster.tolist())},
            item_clusters=dict(enumerate(data.item_cluster.tolist())),
        )


# ---------------------------------------------------------------------------- files


def _check_columns(path: str, available: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {available}")


def _where(path: str, row: int, header_lines: int | None) -> str:
    """``file, line N`` for text files (``header_lines`` lines above the first row), ``file, row N`` otherwise."""
    if header_lines is None:
        return f"{path}, row {row + 1}"
    return f"{path}, line {row + 1 + header_lines}"


def _integer_column(path: str, name: str, values: np.ndarray, header_lines: int | None = 1) -> np.ndarray:
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
            f"{_where(path, row, header_lines)}: column '{name}' must hold integers, found {str(as_text[row])!r}"
        )
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError) as err:
        raise DataError(f"{path}: column '{name}' holds integers that do not fit in int64 ({err})") from err


def _order_column(path: str, name: str, values: np.ndarray, header_lines: int | None = 1) -> np.ndarray:
    """Numbers as they are; timestamps (datetime values or ISO 8601 strings) as int64 seconds."""
    if values.dtype.kind in "iuf":
        if values.dtype.kind == "f" and np.isnan(values).any():
            row = int(np.flatnonzero(np.isnan(values))[0])
            raise DataError(f"{_where(path, row, header_lines)}: column '{name}' is empty")
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
        f"{_where(path, row, header_lines)}: column '{name}' must be a number or an ISO 8601 timestamp, "
        f"found {str(text[row])!r}"
    )


class InteractionLogSource(InteractionSource):
    """Any interaction log in csv, parquet or json lines, read with ``datasets.load_dataset``.

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

    def _raise_first_bad_csv_value(self, sep: str) -> None:
        """Scan the wanted columns as text; raise the DataError of the first bad value, if any."""
        import pandas as pd

        wanted = {self.user_column, self.item_column, self.order_column}
        try:
            chunks = pd.read_csv(
                self.path, sep=sep, usecols=lambda c: c in wanted, dtype=str, keep_default_na=False,
                chunksize=1 << 20,
            )
            first_line = 1  # the header
            for chunk in chunks:
                for c in (self.user_column, self.item_column):
                    if c in chunk:
                        _integer_column(self.path, c, chunk[c].to_numpy(), first_line)
                if self.order_column in chunk:
                    _order_column(self.path, self.order_column, chunk[self.order_column].to_numpy(), first_line)
                first_line += len(chunk)
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - the reader's own error is reported instead
            return

    def load(self) -> InteractionLog:
        import datasets

        # glob.glob, not Path().glob: the latter refuses absolute patterns.
        if not Path(self.path).exists() and not glob.glob(self.path):
            raise DataError(f"{self.path}: file not found")
        fmt = self._format()
        kwargs = {}
        if fmt == "csv":
            sep = self.delimiter if self.delimiter != "auto" else ("\t" if ".tsv" in self.path.lower() else ",")
            kwargs["sep"] = sep
        if Path(self.path).exists() and Path(self.path).stat().st_size == 0:
            raise DataError(f"{self.path}: the file is empty")
        datasets.disable_progress_bars()
        try:
            table = datasets.load_dataset(fmt, data_files=self.path, split="train", **kwargs)
        except Exception as err:  # datasets wraps reader errors in its own exception types
            cause = err.__cause__ or err
            # Any failure to read a parquet file means a damaged file (its schema is in the footer).
            if fmt == "parquet" or isinstance(cause, (EOFError, OSError, zlib.error, zipfile.BadZipFile)):
                raise DataError(
                    f"{self.path}: unreadable, truncated or corrupt file ({type(cause).__name__}: {cause})"
                ) from err
            if "corresponds to no data" in str(err):  # what datasets says when the reader yields no row
                raise DataError(f"{self.path}: the file has no rows") from err
            if fmt == "csv" and Path(self.path).is_file():
                # datasets types each block of rows from its first one: a bad value further down
                # is a cast error without a line number. Find that line.
                self._raise_first_bad_csv_value(kwargs["sep"])
            raise DataError(f"{self.path}: could not be parsed as {fmt} ({type(cause).__name__}: {cause})") from err
        if len(table) == 0:
            raise DataError(f"{self.path}: the file has no rows")
        wanted = [self.user_column, self.item_column, self.order_column]
        _check_columns(self.path, table.column_names, wanted)
        # Line numbers for text formats (csv has a header line); row numbers for parquet.
        header = {"csv": 1, "json": 0}.get(fmt)
        # Whole Arrow columns, never per-row Python access.
        arrow = table.with_format("arrow")[:]
        columns = {c: arrow.column(c).to_numpy(zero_copy_only=False) for c in wanted}
        for c in wanted:
            if arrow.column(c).null_count:
                row = int(np.flatnonzero(arrow.column(c).is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{_where(self.path, row, header)}: column '{c}' is empty")
        order = _order_column(self.path, self.order_column, columns[self.order_column], header)
        return InteractionLog(
            user_ids=_integer_column(self.path, self.user_column, columns[self.user_column], header),
            item_ids=_integer_column(self.path, self.item_column, columns[self.item_column], header),
            order=order,
            timestamps=order,
            name=self.path,
        )


# ---------------------------------------------------------------------------- MovieLens

_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
# MD5 of the official archives, as GroupLens publishes them beside each zip (<name>.zip.md5).
_ARCHIVE_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
}
_RATINGS_FILE = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-20m": "ratings.csv"}
# The ML-1M copy in shared/data: all ratings with a per-user order column (see its SOURCE.md).
_ML1M_ORDERED = "ratings_ordered.csv.gz"
_ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _read_table(path: Path, sep: str, names: list[str], header: bool, encoding: str = "latin-1"):
    """Read a delimited file with pandas' C parser; multi-character separators are rewritten first.

    Header-less files are the raw GroupLens formats: quote characters there are part of the text.
    """
    import pandas as pd

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        if len(sep) > 1:
            raw = raw.replace(sep.encode(), b"\t")
            sep = "\t"
        frame = pd.read_csv(
            io.BytesIO(raw), sep=sep, header=0 if header else None, names=None if header else names,
            encoding=encoding, engine="c", quoting=csv.QUOTE_MINIMAL if header else csv.QUOTE_NONE,
        )
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: unreadable, truncated or corrupt file ({type(err).__name__}: {err})") from err
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: could not be parsed ({err})") from err
    if len(frame) == 0:
        raise DataError(f"{path}: the file has no rows")
    return frame


def _number_column(path: Path, name: str, column, header_lines: int, allow_missing: bool = False) -> np.ndarray:
    """A pandas column as float64; anything that is not a number (or empty, unless allowed) is an error."""
    import pandas as pd

    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(numbers)
    if allow_missing:
        bad &= column.notna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{_where(str(path), row, header_lines)}: column '{name}' must be a number, found {str(column.iloc[row])!r}"
        )
    return numbers


class MovieLensSource(InteractionSource):
    """MovieLens 100K / 1M / 20M from the original GroupLens files, with titles and genres.

    Looks for the ratings file (``u.data``, ``ratings.dat`` or ``ratings.csv``) in
    ``data_dir``; for ML-1M it also reads ``ratings_ordered.csv.gz`` (all ratings with a
    per-user time order, as in ``shared/data/ml-1m``). When nothing is there and
    ``download`` is true, it fetches the official archive into ``cache_dir``, checks its
    MD5 and unpacks it; offline it fails saying where to put the files.

    Args:
        variant: which MovieLens release.
        data_dir: directory holding the files (default: ``<cache_dir>/<variant>``).
        cache_dir: where downloads go.
        download: fetch the archive when the files are missing.
        min_rating: keep only ratings >= this (0 keeps all, as the reference numbers do).
        mirror: base URL of the archives (``<mirror><variant>.zip``); the checksum is checked whatever the mirror.
    """

    def __init__(
        self,
        variant: Literal["ml-100k", "ml-1m", "ml-20m"] = "ml-1m",
        data_dir: str | None = None,
        cache_dir: str = "~/.cache/rails_lightning",
        download: bool = True,
        min_rating: float = 0.0,
        mirror: str = _GROUPLENS,
    ) -> None:
        self.variant = variant
        self.mirror = mirror
        self.cache_dir = Path(cache_dir).expanduser()
        self.data_dir = Path(data_dir).expanduser() if data_dir else self.cache_dir / variant
        self.download = download
        self.min_rating = min_rating

    @property
    def description(self) -> str:
        return f"MovieLens {self.variant} ({self.data_dir})"

    # -- locating / downloading
    def _ratings_path(self) -> Path:
        candidates = [self.data_dir / _RATINGS_FILE[self.variant]]
        if self.variant == "ml-1m":
            candidates.append(self.data_dir / _ML1M_ORDERED)
        for path in candidates:
            if path.exists():
                return path
        if not self.download:
            raise DataError(
                f"{self.variant}: none of {[str(c) for c in candidates]} exists and download is off. "
                f"Put the GroupLens files there (from {self.mirror}{self.variant}.zip) or set download: true."
            )
        self._download()
        return candidates[0]

    def _download(self) -> None:
        url = f"{self.mirror}{self.variant}.zip"
        parent = self.data_dir.parent
        created = [p for p in (parent, *parent.parents) if not p.exists()]  # innermost first
        parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s", url)
        try:
            with tempfile.TemporaryDirectory(dir=parent, prefix=f".{self.variant}-download-") as tmp:
                archive = Path(tmp) / "archive.zip"
                try:
                    with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                        shutil.copyfileobj(response, out)
                except (OSError, ValueError, http.client.HTTPException) as err:
                    raise DataError(
                        f"{self.variant}: could not download {url} ({err}). Offline? Download the archive elsewhere, "
                        f"unzip it and put its files in {self.data_dir} (or set data_dir)."
                    ) from err
                digest = hashlib.md5(archive.read_bytes()).hexdigest()
                if digest != _ARCHIVE_MD5[self.variant]:
                    raise DataError(
                        f"{url}: checksum mismatch (md5 {digest}, expected {_ARCHIVE_MD5[self.variant]})"
                    )
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
                # Only a complete, verified directory is moved into place.
                try:
                    os.replace(Path(tmp) / self.variant, self.data_dir)
                except OSError as err:
                    raise DataError(
                        f"{self.data_dir}: could not put the downloaded files there ({err}); "
                        "empty or remove that directory, or set data_dir"
                    ) from err
        except BaseException:
            # Leave the cache as it was: remove the (still empty) directories made above.
            for directory in created:
                try:
                    directory.rmdir()
                except OSError:
                    break
            raise

    # -- reading
    def load(self) -> InteractionLog:
        path = self._ratings_path()
        if path.name == _ML1M_ORDERED:
            header = 1
            frame = _read_table(path, ",", [], header=True)
            _check_columns(str(path), list(frame.columns), ["user_id", "movie_id", "rating", "seq_pos", "timestamp"])
            # A third of timestamps are missing, all of them early training ratings (SOURCE.md):
            # the per-user order comes from seq_pos; for the global clock they sit at the earliest time.
            ts = _number_column(path, "timestamp", frame["timestamp"], header, allow_missing=True)
            known = ts[~np.isnan(ts)]
            timestamps = np.where(np.isnan(ts), known.min() if len(known) else 0, ts).astype(np.int64)
            order = _integer_column(str(path), "seq_pos", frame["seq_pos"].to_numpy(), header)
        else:
            columns = ["user_id", "movie_id", "rating", "timestamp"]
            if self.variant == "ml-100k":
                header, frame = 0, _read_table(path, "\t", columns, header=False)
            elif self.variant == "ml-1m":
                header, frame = 0, _read_table(path, "::", columns, header=False)
            else:
                header = 1
                frame = _read_table(path, ",", [], header=True, encoding="utf-8")
                frame = frame.rename(columns={"userId": "user_id", "movieId": "movie_id"})
            _check_columns(str(path), list(frame.columns), columns)
            order = timestamps = _integer_column(str(path), "timestamp", frame["timestamp"].to_numpy(), header)
        keep = _number_column(path, "rating", frame["rating"], header) >= self.min_rating
        titles, genres = self._movies()
        return InteractionLog(
            user_ids=_integer_column(str(path), "user_id", frame["user_id"].to_numpy(), header)[keep],
            item_ids=_integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), header)[keep],
            order=order[keep],
            timestamps=timestamps[keep],
            name=str(path),
            item_titles=titles,
            item_genres=genres,
        )

    def _movies(self) -> tuple[dict[int, str] | None, dict[int, list[str]] | None]:
        """Titles and genres by raw movie id, or (None, None) when the movie file is absent."""
        if self.variant == "ml-100k":
            path = self.data_dir / "u.item"
            if not path.exists():
                return None, None
            frame = _read_table(path, "|", ["movie_id", "title", "date", "video", "url", *_ML100K_GENRES], header=False)
            ids = _integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), 0).tolist()
            flags = frame[_ML100K_GENRES].fillna(0).to_numpy() == 1
            genres = {m: [g for g, f in zip(_ML100K_GENRES, row) if f] for m, row in zip(ids, flags)}
            return dict(zip(ids, frame["title"].astype(str))), genres
        if self.variant == "ml-1m":
            path, header = self.data_dir / "movies.dat", 0
            if not path.exists():
                return None, None
            frame = _read_table(path, "::", ["movie_id", "title", "genres"], header=False)
        else:
            path, header = self.data_dir / "movies.csv", 1
            if not path.exists():
                return None, None
            frame = _read_table(path, ",", [], header=True, encoding="utf-8").rename(columns={"movieId": "movie_id"})
            _check_columns(str(path), list(frame.columns), ["movie_id", "title", "genres"])
        ids = _integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), header).tolist()
        # ML-20M marks a movie without genres with the pseudo-genre "(no genres listed)".
        genres = {
            m: [g for g in str(gs).split("|") if g != "(no genres listed)"]
            for m, gs in zip(ids, frame["genres"].fillna(""))
        }
        return dict(zip(ids, frame["title"].astype(str))), genres
