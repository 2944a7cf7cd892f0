"""MovieLens ratings as landing events: the real-data source of the demo and the evaluation.

Accepted inputs (the format is detected from the file name and checked against the content):

- ``ml-latest`` / ``ml-latest-small``: ``ratings.csv``, header ``userId,movieId,rating,timestamp``;
- ``ml-100k``: ``u.data``, tab-separated ``user id, item id, rating, timestamp``, no header.

A file with another name is recognised by its first line. ``path`` may also be the folder of an
unpacked download (``ratings.csv`` is looked for first, then ``u.data``).

Mapping of one rating to one landing record (DESIGN.md "Raw event (landing) fields"):

- ``event_id``: ``ml-<userId>-<movieId>-<timestamp>``, deterministic, so a re-import yields the
  same ids and collect's deduplication sees repeated rows of the source as duplicates;
- ``event_time``: the Unix timestamp as ISO-8601 UTC with ``Z`` (``2000-07-30T18:45:03Z``);
- ``event_type``: ``rating``; ``rating``: the rating as a JSON number (``4.0``, ``3.5``);
- ``user_id``: ``ml_<userId>``; ``item_id``: ``ml_movie_<movieId>`` (in ml-100k the item id is
  that release's own numbering, not an ml-latest movieId: ids are comparable only within one
  release, so import one release per lake);
- no session_id, category, price, quantity, email, ip, user_agent or search_query: MovieLens
  has none and the fields are optional.

The release's movie list (``movies.csv`` beside ``ratings.csv``, ``u.item`` beside ``u.data``)
becomes the lake's item catalog (``privrec_pipeline.catalog``), in force from the first
rating's day: item ids as above, the first listed genre as the category, the title.

Records are written to ``landing/interactions/dt=D/events-000.jsonl.gz`` (gzip JSONL), one
partition per UTC calendar day of the timestamp (or of the replayed time, below), each replaced atomically
(``lake.replacing``); within a partition records are ordered by time. Partitions of days
absent from the import are left untouched.

**Replay** (``replay=Replay(days=N, end=D)``): the ratings of 1996-2018 fall on thousands of
sparse days (ml-latest-small: 610 users, about 25 ratings a day), which no daily pipeline would
see as a shop's traffic. A replay keeps the ratings and their order but moves them onto the N
consecutive days ending on D, the same number of ratings each day (rating r of n, in time
order, lands on day floor(r N / n)), spread evenly over the day. Users' histories keep their
order, so the evaluation protocol (last 20% of each user's items by time) holds the same items
out as on the original timestamps. ``event_id`` keeps the original timestamp, so an event's id
does not depend on the replay, and ``event_time`` is the replayed time.

Parsing is vectorized: the file is read with typed columns and sorted by time; the JSON text is
built in batches of whole days (about ``BATCH_ROWS`` ratings), so the text of the full ml-latest
(tens of millions of ratings) is never in memory at once. Only when the typed read or a range
check fails is the file read again as text, in chunks, to name the first offending line and its
problem in an ``InputFormatError``. Nothing is written before the whole file has been checked.
"""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import pandas as pd

from privrec_pipeline import lake as lk
from privrec_pipeline.catalog import ensure_snapshot
from privrec_pipeline.errors import ConfigurationError, InputFormatError

if TYPE_CHECKING:
    import pyarrow as pa

LANDING_FILE = "events-000.jsonl.gz"
COLUMNS = ("user", "item", "rating", "timestamp")
LABELS = {"user": "user id", "item": "movie id", "rating": "rating", "timestamp": "timestamp"}
MIN_RATING, MAX_RATING = 0.5, 5.0  # ml-latest: 0.5-5 in half stars; ml-100k: 1-5
MAX_ID = 2**63 - 1  # ids are read as int64
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a date can name
SECONDS_PER_DAY = 86_400
EPOCH = dt.date(1970, 1, 1)
BATCH_ROWS = 1_000_000  # rows serialized at once (whole days), bounds memory on large files
DIAGNOSE_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class MovieLensFormat:
    """One supported ratings file layout."""

    name: str
    file_name: str
    sep: str
    header: str | None
    description: str


ML_LATEST = MovieLensFormat(
    "ml-latest", "ratings.csv", ",", "userId,movieId,rating,timestamp",
    "a ratings.csv starting with the header 'userId,movieId,rating,timestamp'",
)
ML_100K = MovieLensFormat(
    "ml-100k", "u.data", "\t", None,
    "a u.data of tab-separated user id, item id, rating, timestamp lines without header",
)
FORMATS: tuple[MovieLensFormat, ...] = (ML_LATEST, ML_100K)
MOVIE_FILES = {"ml-latest": "movies.csv", "ml-100k": "u.item"}
ML_100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western")
HINT = ("pass the ratings.csv of ml-latest / ml-latest-small, the u.data of ml-100k, "
        "or the folder of one of these downloads")


@dataclass
class MovieLensImportReport:
    """What an import wrote: the source file and format, counts, and the span of day partitions."""

    source: str
    format: str
    ratings: int
    users: int
    items: int
    days: int
    first_day: str
    last_day: str
    lake: str
    catalog: str | None = None  # the movie list imported as the catalog (None: not found)
    catalog_items: int = 0
    replayed_days: int = 0  # 0: the ratings' own days

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class Ratings:
    """The parsed ratings as parallel arrays, sorted by timestamp (``source_timestamp``: the
    file's own, kept for the event id when ``timestamp`` is a replayed time)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    source_timestamp: np.ndarray | None = None


@dataclass(frozen=True)
class Replay:
    """Move the ratings onto ``days`` consecutive days ending on ``end`` (module docstring)."""

    days: int
    end: dt.date

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ConfigurationError(f"a replay needs at least 1 day, not {self.days}")
        if self.end - dt.timedelta(days=self.days - 1) < EPOCH:
            raise ConfigurationError(f"a replay of {self.days} days ending {self.end} would start before {EPOCH}")

    def apply(self, r: Ratings) -> Ratings:
        """The same ratings, in the same order, with replayed timestamps."""
        n = len(r.timestamp)
        rank = np.arange(n, dtype=np.int64)
        day = rank * self.days // n
        first = np.searchsorted(day, day, side="left")  # first rank of each rating's day
        per_day = np.bincount(day, minlength=self.days)[day]
        start = (self.end - dt.timedelta(days=self.days - 1) - EPOCH).days
        seconds = (rank - first) * SECONDS_PER_DAY // per_day
        timestamp = (start + day) * SECONDS_PER_DAY + seconds
        return Ratings(r.user, r.item, r.rating, timestamp, r.timestamp)


def import_movielens(path: str | Path, lake: str, replay: Replay | None = None) -> MovieLensImportReport:
    """Write the ratings of a MovieLens file (or download folder) to the landing zone of ``lake``,
    on their own days or, with ``replay``, on the replay's days.

    Raises ``InputFormatError`` naming the file (and the line) if the input is not recognised
    or a row is malformed; nothing is written in that case.
    """
    file = _ratings_file(Path(path))
    fmt = _detect_format(file)
    ratings = _read_ratings(file, fmt)
    if replay is not None:
        ratings = replay.apply(ratings)
    days = ratings.timestamp // SECONDS_PER_DAY
    day_starts = np.flatnonzero(np.r_[True, days[1:] != days[:-1]])
    bounds = np.r_[day_starts, len(days)]

    # Serialize batches of whole days (about BATCH_ROWS rows each), then write each day.
    targets = np.arange(BATCH_ROWS, len(days), BATCH_ROWS)
    cuts = np.unique(np.r_[0, bounds[np.searchsorted(bounds, targets)], len(days)])
    for lo, hi in itertools.pairwise(cuts):
        lines = _json_lines(ratings, lo, hi)
        starts = day_starts[(day_starts >= lo) & (day_starts < hi)]
        for start, end in zip(starts, np.r_[starts[1:], hi]):
            day = EPOCH + dt.timedelta(days=int(days[start]))
            data = ("\n".join(lines[start - lo:end - lo]) + "\n").encode("ascii")
            with lk.replacing(lk.path(lk.partition_uri(lake, "landing", day))) as staging:
                # mtime=0: a re-import writes byte-identical files.
                (staging / LANDING_FILE).write_bytes(gzip.compress(data, compresslevel=1, mtime=0))

    first, last = (EPOCH + dt.timedelta(days=int(days[i])) for i in (0, -1))
    movies = _movies_file(file, fmt)
    catalog_items = 0
    if movies is not None:
        # The release's movie list is its public catalog, in force from the first rating's day.
        catalog_items = ensure_snapshot(lake, first, movie_catalog(movies, fmt), str(movies)).items
    return MovieLensImportReport(
        source=str(file), format=fmt.name, ratings=len(days),
        users=len(np.unique(ratings.user)), items=len(np.unique(ratings.item)),
        days=len(day_starts), first_day=first.isoformat(), last_day=last.isoformat(), lake=lake,
        catalog=str(movies) if movies else None, catalog_items=catalog_items,
        replayed_days=replay.days if replay else 0,
    )


def _movies_file(ratings: Path, fmt: MovieLensFormat) -> Path | None:
    """The release's movie list beside its ratings (movies.csv / u.item), if present."""
    candidate = ratings.parent / MOVIE_FILES[fmt.name]
    return candidate if candidate.is_file() else None


def movie_catalog(file: Path, fmt: MovieLensFormat) -> "pa.Table":
    """The movie list as a catalog: ``ml_movie_<id>``, the first listed genre as the category
    (``unknown`` when none is listed), the title; no price.

    ml-latest ``movies.csv``: ``movieId,title,genres`` with genres separated by ``|``;
    ml-100k ``u.item``: ``|``-separated, Latin-1, id, title, dates, URL, then 19 genre flags
    in the order of ``ML_100K_GENRES``."""
    import pyarrow as pa

    try:
        if fmt.name == ML_LATEST.name:
            frame = pd.read_csv(file, dtype={"movieId": "int64", "title": "string", "genres": "string"},
                                keep_default_na=False)
            if list(frame.columns) != ["movieId", "title", "genres"]:
                raise InputFormatError(f"{file}: expected the header 'movieId,title,genres', found "
                                       f"{','.join(map(str, frame.columns))!r}")
            ids, titles = frame["movieId"], frame["title"]
            first_genre = frame["genres"].str.split("|").str[0]
        else:
            frame = pd.read_csv(file, sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
            if frame.shape[1] != 5 + len(ML_100K_GENRES):
                raise InputFormatError(f"{file}: expected {5 + len(ML_100K_GENRES)} '|'-separated fields per line "
                                       f"(ml-100k u.item), found {frame.shape[1]}")
            ids, titles = frame[0].astype("int64"), frame[1]
            flags = frame.iloc[:, 5:].to_numpy() == "1"
            first_genre = pd.Series([ML_100K_GENRES[row.argmax()] if row.any() else "" for row in flags])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFormatError(f"{file}: not a MovieLens movie list ({str(exc).splitlines()[0]})") from exc
    category = first_genre.where(~first_genre.isin(["", "(no genres listed)", "unknown"]), "unknown")
    return pa.table({"item_id": [f"ml_movie_{i}" for i in ids], "category": category.astype(str).tolist(),
                     "title": titles.astype(str).tolist()})


def _ratings_file(path: Path) -> Path:
    """The ratings file itself, or the one found in a download folder."""
    if path.is_dir():
        for fmt in FORMATS:
            if (path / fmt.file_name).is_file():
                return path / fmt.file_name
        raise InputFormatError(f"{path}: folder contains neither ratings.csv nor u.data; {HINT}")
    if not path.is_file():
        raise InputFormatError(f"{path}: no such file or folder; {HINT}")
    return path


def _detect_format(file: Path) -> MovieLensFormat:
    """The format named by the file name (checked against line 1), else the one line 1 matches."""
    with file.open("rb") as fh:
        first = fh.readline(4096).decode("utf-8-sig", errors="replace").rstrip("\r\n")
    matches = {
        ML_LATEST.name: first.strip() == ML_LATEST.header,
        ML_100K.name: len(first.split(ML_100K.sep)) == len(COLUMNS),
    }
    named = next((fmt for fmt in FORMATS if fmt.file_name == file.name), None)
    if named is not None:
        if matches[named.name]:
            return named
        raise InputFormatError(
            f"{file}: line 1: expected {named.description}, found {first[:80]!r}; {HINT}")
    for fmt in FORMATS:
        if matches[fmt.name]:
            return fmt
    raise InputFormatError(
        f"{file}: not a recognised MovieLens ratings file (line 1 is {first[:80]!r}): "
        f"expected {ML_LATEST.description} or {ML_100K.description}; {HINT}")


def _read_csv(file: Path, fmt: MovieLensFormat, **options: object) -> pd.DataFrame:
    """``pd.read_csv`` of the data rows into ``COLUMNS``; ``options`` set types and NA handling."""
    return pd.read_csv(
        file, sep=fmt.sep, header=None, names=list(COLUMNS), index_col=False,
        skiprows=1 if fmt.header else 0, engine="c", encoding="utf-8", **options,
    )


def _read_ratings(file: Path, fmt: MovieLensFormat) -> Ratings:
    """Typed, range-checked arrays sorted by timestamp; any failure is diagnosed by line."""
    try:
        frame = _read_csv(file, fmt, dtype={"user": "int64", "item": "int64",
                                            "rating": "float64", "timestamp": "int64"})
    except pd.errors.EmptyDataError:
        raise InputFormatError(f"{file}: contains no ratings; {HINT}") from None
    except (ValueError, OverflowError, UnicodeDecodeError) as exc:  # ParserError is a ValueError
        _diagnose(file, fmt, exc)
    user, item, rating, ts = (frame[c].to_numpy() for c in COLUMNS)
    if ((user < 0).any() or (item < 0).any() or (ts < 0).any() or (ts > MAX_TIMESTAMP).any()
            or not ((rating >= MIN_RATING) & (rating <= MAX_RATING)).all()):
        _diagnose(file, fmt, None)
    if not len(ts):
        raise InputFormatError(f"{file}: contains no ratings; {HINT}")
    order = np.argsort(ts, kind="stable")
    return Ratings(user[order], item[order], rating[order], ts[order])


def _diagnose(file: Path, fmt: MovieLensFormat, cause: Exception | None) -> NoReturn:
    """Re-read ``file`` as text and raise an InputFormatError naming the offending line.

    ``cause`` is the typed read's error, reported if no line is found at fault (e.g. an id
    beyond int64).
    """
    header_lines = 1 if fmt.header else 0
    try:
        chunks = _read_csv(file, fmt, dtype=str, keep_default_na=False, skip_blank_lines=False,
                           encoding_errors="replace", chunksize=DIAGNOSE_CHUNK_ROWS)
        for chunk in chunks:
            problem = _first_problem(chunk)
            if problem is not None:
                row, message = problem
                line = row + 1 + header_lines
                raise InputFormatError(f"{file}: line {line}: {message}; fix or remove the line")
    except pd.errors.ParserError as exc:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        message = (f"line {found[2]}: {found[3]} fields, expected {found[1]} ({fmt.description})"
                   if found else str(exc))
        raise InputFormatError(f"{file}: {message}; fix or remove the line") from None
    raise InputFormatError(f"{file}: not readable as {fmt.description}: {cause}; {HINT}") from cause


def _first_problem(chunk: pd.DataFrame) -> tuple[int, str] | None:
    """(row index, problem) of the first malformed row of a text chunk; blank lines are fine."""
    found: list[tuple[int, int, str]] = []  # (row, column position, problem)

    def check(position: int, column: str, bad: pd.Series, problem: str) -> None:
        if bad.any():
            row = int(bad.idxmax())
            found.append((row, position, problem.format(value=chunk.at[row, column])))

    blank = (chunk == "").all(axis=1)
    for position, column in enumerate(COLUMNS):
        text = chunk[column]
        label = LABELS[column]
        missing = (text.str.strip() == "") & ~blank
        check(position, column, missing, f"missing {label} (expected {len(COLUMNS)} columns)")
        present = ~missing & ~blank
        value = pd.to_numeric(text.where(present), errors="coerce")  # NaN where not present
        if column == "rating":
            check(position, column, present & value.isna(), f"{label} {{value!r}} is not a number")
            check(position, column, value.notna() & ~value.between(MIN_RATING, MAX_RATING),
                  f"{label} {{value!r}} is outside the MovieLens scale {MIN_RATING}-{MAX_RATING}")
        else:
            check(position, column, present & (value.isna() | (value % 1 != 0)),
                  f"{label} {{value!r}} is not an integer")
            limit = MAX_TIMESTAMP if column == "timestamp" else MAX_ID
            check(position, column, value.notna() & ((value < 0) | (value > limit)),
                  f"{label} {{value!r}} is out of range")
    if not found:
        return None
    row, _, problem = min(found)
    return row, problem


def _json_lines(r: Ratings, lo: int, hi: int) -> list[str]:
    """The landing JSON lines of rows ``lo:hi`` (ids and timestamps are digits: no escaping)."""
    user = pd.Series(r.user[lo:hi]).astype(str)
    item = pd.Series(r.item[lo:hi]).astype(str)
    source = r.timestamp if r.source_timestamp is None else r.source_timestamp
    ts = pd.Series(source[lo:hi]).astype(str)
    time = pd.Series(np.datetime_as_string(r.timestamp[lo:hi].astype("datetime64[s]"), unit="s"))
    values, index = np.unique(r.rating[lo:hi], return_inverse=True)
    rating = pd.Series(np.array([json.dumps(float(v)) for v in values], dtype=object)[index])
    lines = ('{"event_id":"ml-' + user + "-" + item + "-" + ts + '","event_time":"' + time
             + 'Z","event_type":"rating","user_id":"ml_' + user + '","item_id":"ml_movie_' + item
             + '","rating":' + rating + "}")
    return lines.tolist()
