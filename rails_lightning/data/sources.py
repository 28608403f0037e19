"""Where interactions come from: synthetic, MovieLens, or any csv / parquet / json-lines log.

A source is chosen in YAML with ``class_path`` and returns an ``InteractionLog``.
Reading files is the only side effect here; downloads land in a cache directory
through a temporary file that is renamed only after its checksum matched, so a
crash or a bad download never leaves a half-written file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
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


def _integer_column(path: str, name: str, values: np.ndarray, header_lines: int = 1) -> np.ndarray:
    """Return ``values`` as int64 or raise naming the first offending line."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    as_text = values.astype(str)
    ok = np.char.isdigit(np.char.lstrip(as_text, "-"))
    if values.dtype.kind == "f":
        ok = np.isfinite(values) & (values == np.round(values))
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(
            f"{path}, line {row + 1 + header_lines}: column '{name}' must hold integer ids, found {as_text[row]!r}"
        )
    return values.astype(np.int64)


def _order_column(path: str, name: str, values: np.ndarray, header_lines: int = 1) -> np.ndarray:
    if values.dtype.kind in "iuf":
        if values.dtype.kind == "f" and np.isnan(values).any():
            row = int(np.flatnonzero(np.isnan(values))[0])
            raise DataError(f"{path}, line {row + 1 + header_lines}: column '{name}' is empty")
        return values
    if values.dtype.kind == "M":
        return values.astype("datetime64[s]").astype(np.int64)
    row = 0
    raise DataError(
        f"{path}, line {row + 1 + header_lines}: column '{name}' must be a number or a timestamp, "
        f"found {values[row]!r}"
    )


class InteractionLogSource(InteractionSource):
    """Any interaction log in csv, parquet or json lines, read with ``datasets.load_dataset``.

    Args:
        path: the file (or a glob of files) to read.
        user_column: column with integer user ids.
        item_column: column with integer item ids.
        order_column: column that orders each user's events: a timestamp or a position.
            Also used as the global clock of the temporal split.
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

    def load(self) -> InteractionLog:
        import datasets

        if not any(Path().glob(self.path)) and not Path(self.path).exists():
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
        except (EOFError, OSError, zipfile.BadZipFile, gzip.BadGzipFile) as err:
            raise DataError(f"{self.path}: unreadable or truncated file ({type(err).__name__}: {err})") from err
        except Exception as err:  # datasets wraps parser errors in its own exception types
            cause = err.__cause__ or err
            raise DataError(f"{self.path}: could not be parsed as {fmt} ({type(cause).__name__}: {cause})") from err
        if len(table) == 0:
            raise DataError(f"{self.path}: the file has no rows")
        wanted = [self.user_column, self.item_column, self.order_column]
        _check_columns(self.path, table.column_names, wanted)
        header = 1 if fmt == "csv" else 0
        # Whole Arrow columns, never per-row Python access.
        arrow = table.with_format("arrow")[:]
        columns = {c: arrow.column(c).to_numpy(zero_copy_only=False) for c in wanted}
        for c in (self.user_column, self.item_column):
            if arrow.column(c).null_count:
                row = int(np.flatnonzero(arrow.column(c).is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{self.path}, line {row + 1 + header}: column '{c}' is empty")
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


def _read_table(path: Path, sep: str, names: list[str], header: bool, usecols: list[int] | None = None):
    """Read a delimited file with pandas' C parser; multi-character separators are rewritten first."""
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
            usecols=usecols, encoding="latin-1", engine="c",
        )
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: unreadable or truncated file ({type(err).__name__}: {err})") from err
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: could not be parsed ({err})") from err
    if len(frame) == 0:
        raise DataError(f"{path}: the file has no rows")
    return frame


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
    """

    def __init__(
        self,
        variant: Literal["ml-100k", "ml-1m", "ml-20m"] = "ml-1m",
        data_dir: str | None = None,
        cache_dir: str = "~/.cache/rails_lightning",
        download: bool = True,
        min_rating: float = 0.0,
    ) -> None:
        self.variant = variant
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
                f"Put the GroupLens files there (from {_GROUPLENS}{self.variant}.zip) or set download: true."
            )
        self._download()
        return candidates[0]

    def _download(self) -> None:
        url = f"{_GROUPLENS}{self.variant}.zip"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s", url)
        with tempfile.TemporaryDirectory(dir=self.data_dir.parent) as tmp:
            archive = Path(tmp) / "archive.zip"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as err:
                raise DataError(
                    f"{self.variant}: could not download {url} ({err}). Offline? Download the archive elsewhere, "
                    f"unzip it and put its files in {self.data_dir} (or set data_dir)."
                ) from err
            digest = hashlib.md5(archive.read_bytes()).hexdigest()
            if digest != _ARCHIVE_MD5[self.variant]:
                raise DataError(f"{url}: checksum mismatch (md5 {digest}, expected {_ARCHIVE_MD5[self.variant]})")
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            # Only a complete, verified directory is moved into place.
            os.replace(Path(tmp) / self.variant, self.data_dir)

    # -- reading
    def load(self) -> InteractionLog:
        path = self._ratings_path()
        if path.name == _ML1M_ORDERED:
            frame = _read_table(path, ",", [], header=True)
            _check_columns(str(path), list(frame.columns), ["user_id", "movie_id", "rating", "seq_pos", "timestamp"])
            # A third of timestamps are missing, all of them early training ratings (SOURCE.md):
            # the per-user order comes from seq_pos; for the global clock they sit at the earliest time.
            ts = frame["timestamp"].to_numpy(dtype=np.float64)
            timestamps = np.where(np.isnan(ts), np.nanmin(ts), ts).astype(np.int64)
            users, items, order = frame["user_id"], frame["movie_id"], frame["seq_pos"].to_numpy(np.int64)
        else:
            if self.variant == "ml-100k":
                frame = _read_table(path, "\t", ["user_id", "movie_id", "rating", "timestamp"], header=False)
            elif self.variant == "ml-1m":
                frame = _read_table(path, "::", ["user_id", "movie_id", "rating", "timestamp"], header=False)
            else:
                frame = _read_table(path, ",", [], header=True).rename(columns={"userId": "user_id", "movieId": "movie_id"})
            _check_columns(str(path), list(frame.columns), ["user_id", "movie_id", "rating", "timestamp"])
            users, items = frame["user_id"], frame["movie_id"]
            order = timestamps = _integer_column(str(path), "timestamp", frame["timestamp"].to_numpy(), 0)
        keep = frame["rating"].to_numpy() >= self.min_rating
        titles, genres = self._movies()
        return InteractionLog(
            user_ids=_integer_column(str(path), "user_id", users.to_numpy(), 0)[keep],
            item_ids=_integer_column(str(path), "movie_id", items.to_numpy(), 0)[keep],
            order=np.asarray(order)[keep],
            timestamps=np.asarray(timestamps)[keep],
            name=str(path),
            item_titles=titles,
            item_genres=genres,
        )

    def _movies(self) -> tuple[dict[int, str] | None, dict[int, list[str]] | None]:
        if self.variant == "ml-100k":
            path = self.data_dir / "u.item"
            if not path.exists():
                return None, None
            frame = _read_table(path, "|", ["movie_id", "title", "date", "video", "url", *_ML100K_GENRES], header=False)
            flags = frame[_ML100K_GENRES].to_numpy()
            genres = {int(m): [g for g, f in zip(_ML100K_GENRES, row) if f] for m, row in zip(frame["movie_id"], flags)}
            return dict(zip(frame["movie_id"].astype(int), frame["title"].astype(str))), genres
        path = self.data_dir / ("movies.dat" if self.variant == "ml-1m" else "movies.csv")
        if not path.exists():
            return None, None
        if self.variant == "ml-1m":
            frame = _read_table(path, "::", ["movie_id", "title", "genres"], header=False)
        else:
            frame = _read_table(path, ",", [], header=True).rename(columns={"movieId": "movie_id"})
        ids = frame["movie_id"].astype(int)
        return dict(zip(ids, frame["title"].astype(str))), {
            int(m): str(g).split("|") for m, g in zip(ids, frame["genres"])
        }
