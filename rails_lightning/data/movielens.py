"""``MovieLensSource``: MovieLens 100K / 1M / 20M from the original GroupLens files.

Downloads land in a cache directory through a temporary directory that is moved into place only
after the archive's MD5 matched, so a crash or a bad download never leaves a half-written file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from rails_lightning.data.actions import actions_from_ratings
from rails_lightning.data.columns import check_columns, integer_column, number_column
from rails_lightning.data.item_content import ItemContent
from rails_lightning.data.sequences import InteractionLog
from rails_lightning.data.source import InteractionSource
from rails_lightning.errors import DataError

log = logging.getLogger(__name__)

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


def _fill_missing_times(users: np.ndarray, order: np.ndarray, times: np.ndarray, in_train: np.ndarray) -> np.ndarray:
    """Times (M,) with NaN where missing -> int64 seconds, each missing time filled from the same user's known ones.

    Known times never decrease along a user's sequence (SOURCE.md), and the missing ones are training ratings:
    a missing time takes the user's previous known time (a lower bound, so still in the training period); before
    the user's first known time, that first known time if it is a training rating's, else the earliest known time
    of the whole log. The user's times stay non-decreasing, the training period keeps every training rating, and
    the gaps between a user's items stay those of their own clock (what HSTU's time bias reads)."""
    M = len(times)
    if M == 0 or np.isnan(times).all():
        return np.zeros(M, dtype=np.int64)
    by_sequence = np.lexsort((order, users))  # each user's ratings in seq_pos order
    t, user, train = times[by_sequence], users[by_sequence], in_train[by_sequence]
    known = ~np.isnan(t)
    rows = np.arange(M)
    previous = np.maximum.accumulate(np.where(known, rows, -1))  # latest known row at or before each row
    following = np.minimum.accumulate(np.where(known, rows, M)[::-1])[::-1]  # earliest known row at or after
    previous_ok = (previous >= 0) & (user[np.maximum(previous, 0)] == user)
    following_ok = (following < M) & (user[np.minimum(following, M - 1)] == user) & train[np.minimum(following, M - 1)]
    filled = np.where(previous_ok, t[np.maximum(previous, 0)], np.nan)
    filled = np.where(~previous_ok & following_ok, t[np.minimum(following, M - 1)], filled)
    filled = np.where(np.isnan(filled), np.nanmin(times), filled)
    out = np.empty(M, dtype=np.int64)
    out[by_sequence] = filled.astype(np.int64)
    return out


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


class MovieLensSource(InteractionSource):
    """MovieLens 100K / 1M / 20M from the original GroupLens files, with titles and genres.

    The movie file also becomes the log's item content: text ``title`` (without the year), numeric ``year``,
    categorical ``genres``.

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
        actions_from_ratings: give every rating action types by ``rails_lightning.data.actions.RATING_ACTIONS``:
            rated (always), liked (>= 4 stars), loved (5), disliked (<= 2).
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
        actions_from_ratings: bool = False,
    ) -> None:
        self.variant = variant
        self.mirror = mirror
        self.cache_dir = Path(cache_dir).expanduser()
        self.data_dir = Path(data_dir).expanduser() if data_dir else self.cache_dir / variant
        self.download = download
        self.min_rating = min_rating
        self.actions_from_ratings = actions_from_ratings

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
            check_columns(str(path), list(frame.columns), ["user_id", "movie_id", "rating", "seq_pos", "timestamp"])
            # A third of timestamps are missing, all of them training ratings (SOURCE.md); the per-user
            # order comes from seq_pos, and the missing times are filled from the user's own known ones.
            ts = number_column(str(path), "timestamp", frame["timestamp"], header, allow_missing=True)
            order = integer_column(str(path), "seq_pos", frame["seq_pos"].to_numpy(), header)
            users = integer_column(str(path), "user_id", frame["user_id"].to_numpy(), header)
            in_train = (frame["time_split"] == "train").to_numpy() if "time_split" in frame.columns else np.zeros(len(ts), bool)
            timestamps = _fill_missing_times(users, order, ts, in_train)
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
            check_columns(str(path), list(frame.columns), columns)
            order = timestamps = integer_column(str(path), "timestamp", frame["timestamp"].to_numpy(), header)
        ratings = number_column(str(path), "rating", frame["rating"], header)
        keep = ratings >= self.min_rating
        actions, action_names = actions_from_ratings(ratings[keep]) if self.actions_from_ratings else (None, ())
        titles, genres = self._movies()
        return InteractionLog(
            user_ids=integer_column(str(path), "user_id", frame["user_id"].to_numpy(), header)[keep],
            item_ids=integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), header)[keep],
            order=order[keep],
            timestamps=timestamps[keep],
            name=str(path),
            item_titles=titles,
            item_genres=genres,
            item_content=_movie_content(titles, genres),
            actions=actions,
            action_names=action_names,
        )

    def _movies(self) -> tuple[dict[int, str] | None, dict[int, list[str]] | None]:
        """Titles and genres by raw movie id, or (None, None) when the movie file is absent."""
        if self.variant == "ml-100k":
            path = self.data_dir / "u.item"
            if not path.exists():
                return None, None
            frame = _read_table(path, "|", ["movie_id", "title", "date", "video", "url", *_ML100K_GENRES], header=False)
            ids = integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), 0).tolist()
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
            check_columns(str(path), list(frame.columns), ["movie_id", "title", "genres"])
        ids = integer_column(str(path), "movie_id", frame["movie_id"].to_numpy(), header).tolist()
        # ML-20M marks a movie without genres with the pseudo-genre "(no genres listed)".
        genres = {
            m: [g for g in str(gs).split("|") if g != "(no genres listed)"]
            for m, gs in zip(ids, frame["genres"].fillna(""))
        }
        return dict(zip(ids, frame["title"].astype(str))), genres


_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def _movie_content(titles: dict[int, str] | None, genres: dict[int, list[str]] | None) -> ItemContent | None:
    """The movie file as item content: the title without its year (text), the year (numeric, NaN where the
    title has none), the genres (categorical, multi-valued)."""
    if titles is None:
        return None
    ids = sorted(titles)
    years = [_YEAR.search(titles[m]) for m in ids]
    return ItemContent(
        raw_ids=np.array(ids, dtype=np.int64),
        text={"title": [_YEAR.sub("", titles[m]) for m in ids]},
        categorical={"genres": [tuple((genres or {}).get(m, ())) for m in ids]},
        numeric={"year": np.array([float(y.group(1)) if y else np.nan for y in years])},
    )

