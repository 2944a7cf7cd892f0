"""The item catalog: a public input, loaded from CSV / JSON lines / Parquet, checked by its own
suite, versioned by day, and refused with a message that names the problem when unusable."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest

from privrec_pipeline import catalog as cat

DAY = dt.date(2026, 1, 15)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_csv_catalog_is_loaded_typed_and_versioned_by_day(tmp_path):
    lake = str(tmp_path / "lake")
    source = _write(tmp_path / "items.csv", "item_id,category,price,title,available\n"
                                            "007,books,12.5,A spy story,true\nitm_2,music,,Songs,no\nitm_3,books,0,,\n")
    snap = cat.write_snapshot(lake, DAY, cat.read_file(source), str(source))
    assert (snap.items, snap.categories, snap.day) == (3, 2, DAY)
    items = cat.read_items(cat.snapshot_for(lake, DAY)).to_pylist()
    assert items == [
        {"item_id": "007", "category": "books", "price": 12.5, "title": "A spy story", "available": True},
        {"item_id": "itm_2", "category": "music", "price": None, "title": "Songs", "available": False},
        {"item_id": "itm_3", "category": "books", "price": 0.0, "title": None, "available": None},
    ]
    # A snapshot is the catalog from its day on, until the next one.
    assert cat.snapshot_for(lake, DAY - dt.timedelta(days=1)) is None
    later = DAY + dt.timedelta(days=10)
    cat.write_snapshot(lake, later, pa.table({"item_id": ["itm_9"], "category": ["toys"]}), "by hand")
    assert cat.snapshot_for(lake, DAY + dt.timedelta(days=9)).day == DAY
    assert cat.snapshot_for(lake, later + dt.timedelta(days=400)).items == 1


def test_json_lines_and_parquet_catalogs_read_the_same(tmp_path):
    rows = [{"item_id": "a", "category": "x", "price": 1.0}, {"item_id": "b", "category": "y"}]
    jsonl = _write(tmp_path / "items.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "items.parquet")
    assert cat.read_file(jsonl).equals(cat.read_file(tmp_path / "items.parquet"))


@pytest.mark.parametrize(("text", "message"), [
    ("item_id,category\na,x\nb,y\na,z\nb,x\na,x\n", r"2 item_id\(s\) appear more than once \('a' x3, 'b' x2\)"),
    ("item_id,category\na,x\n,y\n  ,z\n", r"2 row\(s\) without item_id \(rows 2, 3\)"),
    ("item_id,category\na,x\nb,\n", r"1 row\(s\) without category \(rows 2\)"),
    ("item_id,category\na,x\n b ,y\n", r"1 item_id\(s\) with leading or trailing whitespace \(row 2 ' b '\)"),
    ("item_id,category,price\na,x,-1\nb,y,1\n", r"price\(s\) negative or not finite \(row 1 -1\.0\)"),
    ("item_id,category,price\na,x,cheap\n", r"value\(s\) of price are not a number \(row 1 'cheap'\)"),
    ("item_id,category,available\na,x,maybe\n", r"available are not true/false"),
    ("item_id,price\na,1\n", r"has no category column"),
    ("item_id,category,colour\na,x,red\n", r"unknown catalog column\(s\) colour"),
    ("item_id,category\n", r"the catalog has no items"),
])
def test_a_bad_catalog_is_refused_naming_the_problem_and_nothing_is_written(tmp_path, text, message):
    lake = str(tmp_path / "lake")
    source = _write(tmp_path / "items.csv", text)
    with pytest.raises(cat.CatalogError, match=message):
        cat.write_snapshot(lake, DAY, cat.read_file(source), str(source))
    assert cat.snapshot_for(lake, DAY) is None


def test_the_catalog_suite_fails_on_what_the_checks_refuse():
    from privrec_pipeline.quality.catalog_suite import validate_catalog

    good = cat.normalize(pa.table({"item_id": ["a", "b"], "category": ["x", "y"], "price": [1.0, None]}), "t")
    assert validate_catalog(good) == []
    bad = cat.normalize(pa.table({"item_id": ["a", "a", None], "category": ["x", None, "y"],
                                  "price": [-2.0, 1.0, 1.0]}), "t")
    assert set(validate_catalog(bad)) == {"catalog.item_id.unique", "catalog.not_null.item_id",
                                          "catalog.not_null.category", "catalog.price.non_negative"}


def test_a_replaced_catalog_file_is_refused(tmp_path):
    import pyarrow.parquet as pq

    lake = str(tmp_path / "lake")
    snap = cat.write_snapshot(lake, DAY, pa.table({"item_id": ["a", "b"], "category": ["x", "y"]}), "t")
    path = tmp_path / "lake" / "catalog" / "items" / f"dt={DAY}" / cat.ITEMS_FILE
    pq.write_table(cat.normalize(pa.table({"item_id": ["a"], "category": ["x"]}), "t"), path)
    with pytest.raises(cat.CatalogError, match="changed after it was written"):
        cat.read_items(snap)


def test_the_same_catalog_written_again_makes_no_new_snapshot(tmp_path):
    lake = str(tmp_path / "lake")
    table = pa.table({"item_id": ["b", "a"], "category": ["y", "x"]})
    first = cat.ensure_snapshot(lake, DAY, table, "generator")
    assert cat.ensure_snapshot(lake, DAY + dt.timedelta(days=3), table, "generator") == first
    changed = cat.ensure_snapshot(lake, DAY + dt.timedelta(days=3), pa.table({"item_id": ["a"], "category": ["x"]}),
                                  "generator")
    assert cat.snapshot_days(lake) == [DAY, DAY + dt.timedelta(days=3)] and changed.items == 1


def test_the_generator_writes_the_catalog_its_events_use(tmp_path):
    import gzip

    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    lake = str(tmp_path / "lake")
    generate_day(GeneratorConfig(date=DAY, events=2000, users=100, items=50, seed=3), lake)
    generate_day(GeneratorConfig(date=DAY + dt.timedelta(days=1), events=2000, users=100, items=50, seed=3), lake)
    assert cat.snapshot_days(lake) == [DAY]  # the same items: one snapshot
    items = {r["item_id"]: r for r in cat.read_items(cat.snapshot_for(lake, DAY)).to_pylist()}
    assert len(items) == 50 and all(r["title"] and r["available"] for r in items.values())
    landing = tmp_path / "lake" / "landing" / "interactions" / f"dt={DAY}"
    for file in landing.glob("*.jsonl.gz"):
        for line in gzip.decompress(file.read_bytes()).splitlines():
            event = json.loads(line)
            assert (event["category"], event["price"]) == (items[event["item_id"]]["category"],
                                                           items[event["item_id"]]["price"])


def test_a_movielens_import_brings_its_movie_list_as_the_catalog(tmp_path):
    from privrec_pipeline.sources.movielens import import_movielens

    latest = tmp_path / "ml-latest"
    latest.mkdir()
    _write(latest / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n2,3,3.5,964982931\n")
    _write(latest / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                                  '2,"Jumanji, The (1995)",Fantasy\n3,Unknown Film,(no genres listed)\n')
    report = import_movielens(latest, str(tmp_path / "lake"))
    assert report.catalog_items == 3
    snap = cat.snapshot_for(str(tmp_path / "lake"), dt.date.fromisoformat(report.first_day))
    assert cat.read_items(snap).select(["item_id", "category", "title"]).to_pylist() == [
        {"item_id": "ml_movie_1", "category": "Adventure", "title": "Toy Story (1995)"},
        {"item_id": "ml_movie_2", "category": "Fantasy", "title": "Jumanji, The (1995)"},
        {"item_id": "ml_movie_3", "category": "unknown", "title": "Unknown Film"},
    ]
    old = tmp_path / "ml-100k"
    old.mkdir()
    _write(old / "u.data", "1\t2\t4\t874965758\n")
    flags = ["0"] * 19
    flags[2] = flags[5] = "1"  # Adventure, Comedy
    (old / "u.item").write_bytes(("2|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
                                  + "3|Caf\xe9 (1996)|01-Jan-1996||http://y|" + "|".join(["0"] * 19) + "\n")
                                 .encode("latin-1"))
    report = import_movielens(old, str(tmp_path / "lake100k"))
    snap = cat.snapshot_for(str(tmp_path / "lake100k"), dt.date.fromisoformat(report.first_day))
    assert cat.read_items(snap).select(["item_id", "category", "title"]).to_pylist() == [
        {"item_id": "ml_movie_2", "category": "Adventure", "title": "GoldenEye (1995)"},
        {"item_id": "ml_movie_3", "category": "unknown", "title": "Caf\xe9 (1996)"},
    ]


def test_the_real_ml_latest_small_movie_list_is_a_valid_catalog(tmp_path):
    from conftest import SHARED_DATA, unavailable
    from privrec_pipeline.sources.movielens import ML_LATEST, movie_catalog

    movies = SHARED_DATA / "ml-latest-small" / "movies.csv"
    if not movies.is_file():
        unavailable(f"{movies} is missing")
    snap = cat.write_snapshot(str(tmp_path / "lake"), DAY, movie_catalog(movies, ML_LATEST), str(movies))
    assert snap.items == 9742 and snap.categories == 19


def test_cli_loads_and_shows_the_catalog_and_prints_input_as_text(tmp_path):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    lake = str(tmp_path / "lake")
    source = _write(tmp_path / "items.csv", "item_id,category\n[b]x:x:,books\n[b]x:x:,music\n")
    result = CliRunner().invoke(app, ["catalog", "load", str(source), "--date", str(DAY), "--lake", lake])
    assert result.exit_code == 1 and "'[b]x:x:' x2" in result.output  # not markup, not an emoji
    _write(source, "item_id,category\n[b]x:x:,books\nb,music\n")
    result = CliRunner().invoke(app, ["catalog", "load", str(source), "--date", str(DAY), "--lake", lake])
    assert result.exit_code == 0 and "2 items in 2 categories" in result.output
    shown = CliRunner().invoke(app, ["catalog", "show", "--lake", lake])
    assert shown.exit_code == 0 and f"{DAY}" in shown.output and str(source) in shown.output.replace("\n", "")
    missing = CliRunner().invoke(app, ["catalog", "show", "--lake", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "privrec catalog load" in missing.output


def test_a_snapshot_doctored_with_its_digest_still_cannot_list_an_item_twice(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    lake = str(tmp_path / "lake")
    cat.write_snapshot(lake, DAY, pa.table({"item_id": ["a", "b"], "category": ["x", "y"]}), "t")
    folder = tmp_path / "lake" / "catalog" / "items" / f"dt={DAY}"
    # Someone with write access replaces the items and the recorded digest together: a
    # duplicated id would be one key released twice (two independent noises).
    pq.write_table(cat.normalize(pa.table({"item_id": ["a", "a"], "category": ["x", "x"]}), "t"),
                   folder / cat.ITEMS_FILE)
    meta = json.loads((folder / cat.META_FILE).read_text())
    meta["sha256"] = hashlib.sha256((folder / cat.ITEMS_FILE).read_bytes()).hexdigest()
    (folder / cat.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(cat.CatalogError, match="appear more than once"):
        cat.read_items(cat.snapshot_for(lake, DAY))
