"""MovieLens import (privrec_pipeline.sources.movielens): landing layout, mapping, errors."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import re
from pathlib import Path

import pytest

from conftest import unavailable
from privrec_pipeline.errors import InputFormatError
from privrec_pipeline.lake import partition_uri, path, zone_uri
from privrec_pipeline.sources import movielens
from privrec_pipeline.sources.movielens import MovieLensImportReport, import_movielens

ML_LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
ML_LATEST_SMALL_RATINGS = 100_836
FIELDS = {"event_id", "event_time", "event_type", "user_id", "item_id", "rating"}
UTC_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
HEADER = "userId,movieId,rating,timestamp\n"
GOOD = "1,1,4.0,964982703\n"


def utc_day(timestamp: str) -> dt.date:
    return dt.datetime.fromtimestamp(int(timestamp), tz=dt.UTC).date()


def landing_lines(lake: str) -> dict[str, list[str]]:
    """Partition name -> decoded lines of every landing file in it."""
    zone = Path(zone_uri(lake, "landing"))
    out: dict[str, list[str]] = {}
    for part in sorted(zone.iterdir()):
        out[part.name] = [
            line for f in sorted(part.glob("*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode("utf-8").splitlines()
        ]
    return out


def landing_snapshot(lake: str) -> dict[str, bytes]:
    """Relative path -> decompressed content of every file in the landing zone."""
    zone = Path(zone_uri(lake, "landing"))
    return {str(f.relative_to(zone)): gzip.decompress(f.read_bytes())
            for f in sorted(zone.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def ratings_csv() -> list[list[str]]:
    """The data rows of ml-latest-small's ratings.csv, read with the csv module."""
    path = ML_LATEST_SMALL / "ratings.csv"
    if not path.is_file():
        unavailable(f"MovieLens ml-latest-small not found at {ML_LATEST_SMALL} "
                    "(download and unpack it into shared/data to run these tests)")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["userId", "movieId", "rating", "timestamp"]
    return rows[1:]


@pytest.fixture(scope="module")
def imported(ratings_csv: list[list[str]],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[MovieLensImportReport, str]:
    lake = str(tmp_path_factory.mktemp("ml-lake"))
    return import_movielens(ML_LATEST_SMALL, lake), lake


def test_every_rating_lands_once(imported: tuple[MovieLensImportReport, str],
                                 ratings_csv: list[list[str]]) -> None:
    report, lake = imported
    lines = [line for part in landing_lines(lake).values() for line in part]
    assert len(ratings_csv) == ML_LATEST_SMALL_RATINGS
    assert len(lines) == report.ratings == ML_LATEST_SMALL_RATINGS
    assert report.format == "ml-latest"
    assert report.source == str(ML_LATEST_SMALL / "ratings.csv")
    assert report.users == len({r[0] for r in ratings_csv})
    assert report.items == len({r[1] for r in ratings_csv})
    assert len({json.loads(line)["event_id"] for line in lines}) == len(lines)
    assert json.loads(report.to_json())["ratings"] == ML_LATEST_SMALL_RATINGS


def test_one_partition_per_utc_day(imported: tuple[MovieLensImportReport, str],
                                   ratings_csv: list[list[str]]) -> None:
    report, lake = imported
    days = sorted({utc_day(r[3]) for r in ratings_csv})
    zone = Path(zone_uri(lake, "landing"))
    assert sorted(p.name for p in zone.iterdir()) == [f"dt={d.isoformat()}" for d in days]
    assert report.days == len(days)
    assert (report.first_day, report.last_day) == (days[0].isoformat(), days[-1].isoformat())
    for part in zone.iterdir():
        assert [f.name for f in part.iterdir()] == ["events-000.jsonl.gz"]


def test_every_line_follows_the_mapping(imported: tuple[MovieLensImportReport, str]) -> None:
    _, lake = imported
    for part, lines in landing_lines(lake).items():
        assert lines, part
        for line in lines:
            event = json.loads(line)
            assert set(event) == FIELDS, line
            assert event["event_type"] == "rating"
            assert UTC_SECOND.fullmatch(event["event_time"]), line
            assert part == f"dt={event['event_time'][:10]}"
            assert re.fullmatch(r"ml_\d+", event["user_id"]), line
            assert re.fullmatch(r"ml_movie_\d+", event["item_id"]), line
            assert isinstance(event["rating"], float) and 0.5 <= event["rating"] <= 5.0, line


def test_known_row_round_trips(imported: tuple[MovieLensImportReport, str],
                               ratings_csv: list[list[str]]) -> None:
    _, lake = imported
    user, movie, rating, timestamp = ratings_csv[12_345]
    when = dt.datetime.fromtimestamp(int(timestamp), tz=dt.UTC)
    part = path(partition_uri(lake, "landing", when.date()))
    events = [json.loads(line) for line in gzip.decompress(
        (part / "events-000.jsonl.gz").read_bytes()).splitlines()]
    matching = [e for e in events if e["event_id"] == f"ml-{user}-{movie}-{timestamp}"]
    assert matching == [{
        "event_id": f"ml-{user}-{movie}-{timestamp}",
        "event_time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "event_type": "rating",
        "user_id": f"ml_{user}",
        "item_id": f"ml_movie_{movie}",
        "rating": float(rating),
    }]


def test_reimport_replaces_partitions(ratings_csv: list[list[str]], tmp_path: Path) -> None:
    # A slice of ml-latest-small: each replaced partition costs a rename and a delete, and the
    # property does not depend on the number of partitions.
    rows = ratings_csv[:3_000]
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    lake = str(tmp_path / "lake")
    report = import_movielens(path, lake)
    before = landing_snapshot(lake)
    assert report.days > 10 and len(before) == report.days

    assert import_movielens(path, lake) == report
    assert landing_snapshot(lake) == before  # same content, no duplicates, no staging leftovers
    assert sum(len(v) for v in landing_lines(lake).values()) == len(rows)

    # A changed source replaces the partition's content (not appended to it).
    user, movie, _, timestamp = rows[0]
    rows[0] = [user, movie, "0.5" if rows[0][2] != "0.5" else "5.0", timestamp]
    path.write_text(HEADER + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    import_movielens(path, lake)
    day_lines = landing_lines(lake)[f"dt={utc_day(timestamp).isoformat()}"]
    ratings = [json.loads(line)["rating"] for line in day_lines
               if json.loads(line)["event_id"] == f"ml-{user}-{movie}-{timestamp}"]
    assert ratings == [float(rows[0][2])]
    assert sum(len(v) for v in landing_lines(lake).values()) == len(rows)


def test_batches_and_chunks_do_not_change_the_result(ratings_csv: list[list[str]], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rows = ratings_csv[:2_000]
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    import_movielens(path, str(tmp_path / "whole"))
    monkeypatch.setattr(movielens, "BATCH_ROWS", 7)
    import_movielens(path, str(tmp_path / "batched"))
    assert landing_snapshot(str(tmp_path / "batched")) == landing_snapshot(str(tmp_path / "whole"))

    # Line numbers stay exact across the chunks of the diagnosing re-read (blank lines included).
    monkeypatch.setattr(movielens, "DIAGNOSE_CHUNK_ROWS", 2)
    path.write_text(HEADER + GOOD * 3 + "\n" + GOOD * 2 + "1,2,3.0,soon\n", encoding="utf-8")
    with pytest.raises(InputFormatError, match="line 8: timestamp 'soon' is not an integer"):
        import_movielens(path, str(tmp_path / "bad"))


def test_u_data_imports(tmp_path: Path) -> None:
    download = tmp_path / "ml-100k"
    download.mkdir()
    (download / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
        "196\t51\t2\t881250949\n", encoding="utf-8")
    lake = str(tmp_path / "lake")
    report = import_movielens(download, lake)
    assert (report.format, report.ratings, report.users, report.items, report.days) == (
        "ml-100k", 4, 3, 4, 3)
    lines = landing_lines(lake)
    assert sorted(lines) == ["dt=1997-11-07", "dt=1997-12-04", "dt=1998-04-04"]
    assert sorted(json.loads(line)["item_id"] for line in lines["dt=1997-12-04"]) == [
        "ml_movie_242", "ml_movie_51"]
    assert json.loads(lines["dt=1997-11-07"][0]) == {
        "event_id": "ml-22-377-878887116", "event_time": "1997-11-07T07:18:36Z",
        "event_type": "rating", "user_id": "ml_22", "item_id": "ml_movie_377", "rating": 1.0,
    }


@pytest.mark.parametrize(("rows", "line", "problem"), [
    ("1,abc,4.0,964982703\n", 3, "movie id 'abc' is not an integer"),
    ("x1,2,4.0,964982703\n", 3, "user id 'x1' is not an integer"),
    ("1,2,good,964982703\n", 3, "rating 'good' is not a number"),
    ("1,2,4.0\n", 3, "missing timestamp"),
    ("1,2,4.0,964982703,7\n", 3, "5 fields, expected 4"),
    ("\n\n1,2,4.0,yesterday\n", 5, "timestamp 'yesterday' is not an integer"),
    (GOOD + "1,2,9,964982703\n", 4, "rating '9' is outside the MovieLens scale"),
])
def test_malformed_row_names_file_and_line(tmp_path: Path, rows: str, line: int,
                                           problem: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + GOOD + rows, encoding="utf-8")
    lake = str(tmp_path / "lake")
    with pytest.raises(InputFormatError) as err:
        import_movielens(path, lake)
    assert str(path) in str(err.value)
    assert f"line {line}: {problem}" in str(err.value)
    assert not (tmp_path / "lake").exists()  # nothing written


def test_unknown_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, world\n", encoding="utf-8")
    with pytest.raises(InputFormatError, match=re.escape(str(path))):
        import_movielens(path, str(tmp_path / "lake"))


def test_ratings_csv_without_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(GOOD, encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"line 1: expected a ratings\.csv"):
        import_movielens(path, str(tmp_path / "lake"))


def test_folder_without_ratings_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match=r"neither ratings\.csv nor u\.data"):
        import_movielens(tmp_path, str(tmp_path / "lake"))


REPLAY_END = dt.date(2026, 3, 7)


def test_a_replay_moves_every_rating_onto_n_days_in_order(imported: tuple[MovieLensImportReport, str],
                                                         tmp_path: Path) -> None:
    """Replay: the same events (same ids), the same number each day, on the N days ending on the
    replay's end, each user's history in its original order."""
    report, lake = imported
    replay_lake = str(tmp_path / "replay")
    replayed = import_movielens(ML_LATEST_SMALL, replay_lake, movielens.Replay(7, REPLAY_END))
    assert (replayed.days, replayed.replayed_days, replayed.ratings) == (7, 7, report.ratings)
    assert (replayed.first_day, replayed.last_day) == ("2026-03-01", "2026-03-07")

    original = {json.loads(line)["event_id"]: json.loads(line)
                for lines in landing_lines(lake).values() for line in lines}
    moved = landing_lines(replay_lake)
    assert sorted(moved) == [f"dt={REPLAY_END - dt.timedelta(days=6 - i)}" for i in range(7)]
    sizes = [len(lines) for lines in moved.values()]
    assert sum(sizes) == report.ratings and max(sizes) - min(sizes) <= 1
    events = [json.loads(line) for lines in moved.values() for line in lines]
    assert {e["event_id"] for e in events} == set(original)  # ids keep the source's timestamp
    for part, lines in moved.items():
        assert all(json.loads(line)["event_time"].startswith(part[3:]) for line in lines)
    by_user_source: dict[str, list[str]] = {}
    by_user_replay: dict[str, list[str]] = {}
    for e in sorted(original.values(), key=lambda e: e["event_time"]):
        by_user_source.setdefault(e["user_id"], []).append(e["event_time"])
    for e in sorted(events, key=lambda e: (e["event_time"], original[e["event_id"]]["event_time"])):
        by_user_replay.setdefault(e["user_id"], []).append(original[e["event_id"]]["event_time"])
        assert {k: v for k, v in e.items() if k != "event_time"} == \
            {k: v for k, v in original[e["event_id"]].items() if k != "event_time"}
    assert by_user_replay == by_user_source  # replayed order = source order, user by user


def test_a_replay_needs_days_and_an_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app
    from privrec_pipeline.errors import ConfigurationError

    path = tmp_path / "ratings.csv"
    path.write_text(HEADER + GOOD)
    result = CliRunner().invoke(app, ["import", "movielens", str(path), "--lake", str(tmp_path / "l"),
                                      "--replay-days", "3"])
    assert result.exit_code == 1 and "--replay-days and --replay-end go together" in result.output
    with pytest.raises(ConfigurationError, match="start before 1970-01-01"):
        movielens.Replay(10, dt.date(1970, 1, 5))
    result = CliRunner().invoke(app, ["import", "movielens", str(path), "--lake", str(tmp_path / "l"),
                                      "--replay-days", "3", "--replay-end", "2026-01-03"])
    assert result.exit_code == 0, result.output
    assert sorted(landing_lines(str(tmp_path / "l"))) == ["dt=2026-01-01"]  # one rating: the first day
