"""The item catalog: a public input of the pipeline (a shop's catalog is on its website).

    catalog/items/dt=D/items.parquet    item_id, category, price, title, available
    catalog/items/dt=D/_catalog.json    source, counts, sha256 of items.parquet

A snapshot dated D is the catalog from day D on, until a later snapshot: the catalog of a
day is its latest snapshot dated on or before it (``snapshot_for``).

The DP guarantee of a release over public keys holds for a catalog that does not depend on
the event logs privrec processes: the shop's published item list, or a dataset's published
movie list (MovieLens' ``movies.csv`` lists the movies rated or tagged in that release; it is
published with it, so using it reveals nothing an observer does not already have). A list
built from the item ids seen in the events is not public: a one-user item would appear
because of that user. Such a list must not be loaded as a catalog. Because the catalog is
public, its items and categories are *public partitions* of the DP statistics (every item
gets a noisy value and no partition selection is needed) and the training vocabulary; only
without a catalog does the item set itself need private selection.

Columns (the documented format of ``privrec catalog load``; CSV with a header, JSON lines or
Parquet):

| column      | type    | required | meaning                                              |
|-------------|---------|----------|------------------------------------------------------|
| item_id     | string  | yes      | unique, non-empty; the ``item_id`` of the event logs   |
| category    | string  | yes      | non-empty; the item's category (one per item)        |
| price       | double  | no       | list price, >= 0 and finite when given               |
| title       | string  | no       | display text (public)                                |
| available   | boolean | no       | false: no longer sold (still scored for history)     |

A catalog is checked by its own Great Expectations suite (``suites.yaml``: ``catalog``), and a
failure names the problem with examples (duplicated ids with their count, the rows without an
id); nothing is written then.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import InputFormatError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
ITEMS_FILE = "items.parquet"
META_FILE = "_catalog.json"
REQUIRED = ("item_id", "category")
OPTIONAL = ("price", "title", "available")
COLUMNS = (*REQUIRED, *OPTIONAL)
EXAMPLES = 5  # offending values named in an error


class CatalogError(InputFormatError):
    """A catalog that cannot be used: the message names the file, the problem and examples."""


@dataclass(frozen=True)
class CatalogSnapshot:
    day: dt.date
    uri: str
    source: str
    items: int
    categories: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day.isoformat()}


def schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("item_id", pa.string()), ("category", pa.string()), ("price", pa.float64()),
                      ("title", pa.string()), ("available", pa.bool_())])


def read_file(path: str | Path) -> "pa.Table":
    """A catalog file as an Arrow table (CSV with a header, JSON lines, or Parquet by suffix)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    file = Path(path)
    if not file.is_file():
        raise CatalogError(f"{file}: no such catalog file")
    suffixes = [s.lower() for s in file.suffixes]
    try:
        if suffixes[-1:] == [".parquet"]:
            table = pq.read_table(file)
        elif suffixes[-1:] in ([".jsonl"], [".json"], [".ndjson"]):
            table = pjson.read_json(file)
        elif suffixes[-1:] in ([".csv"], [".tsv"]):
            delimiter = "\t" if suffixes[-1] == ".tsv" else ","
            # Every column as text: ids like 007 keep their zeros; types are checked below.
            table = pcsv.read_csv(file, parse_options=pcsv.ParseOptions(delimiter=delimiter),
                                  convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}))
        else:
            raise CatalogError(f"{file}: unknown catalog format {''.join(suffixes) or '(no suffix)'}; "
                               "use .csv (with a header), .tsv, .jsonl or .parquet")
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise CatalogError(f"{file}: not a readable catalog ({str(exc).splitlines()[0]})") from exc
    return normalize(table, str(file))


def normalize(table: "pa.Table", source: str) -> "pa.Table":
    """The table with the catalog's columns and types; a clear error for a missing required
    column, an unknown column or a value of the wrong type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CatalogError(f"{source}: the catalog has no {', '.join(missing)} column (found "
                           f"{', '.join(table.column_names) or 'no columns'}; needed: {', '.join(REQUIRED)})")
    unknown = [c for c in table.column_names if c not in COLUMNS]
    if unknown:
        raise CatalogError(f"{source}: unknown catalog column(s) {', '.join(unknown)} (known: {', '.join(COLUMNS)})")
    columns = {}
    for field in schema():
        if field.name not in table.column_names:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
            continue
        values = table.column(field.name)
        if pa.types.is_string(field.type):
            try:
                values = values.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CatalogError(f"{source}: column {field.name} is {values.type}, not text") from exc
            trimmed = pc.utf8_trim_whitespace(values)
            # Item ids are kept as written: events name items exactly, so an id with surrounding
            # spaces is a problem to fix (``problems``), not something to repair silently.
            values = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()),
                                values if field.name == "item_id" else trimmed)
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = _parse_text(values, field, source)
        else:
            try:
                values = values.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CatalogError(f"{source}: column {field.name} is {values.type}, not {field.type}") from exc
        columns[field.name] = values
    return pa.table(columns, schema=schema())


def _parse_text(values: "pa.ChunkedArray", field: "pa.Field", source: str) -> "pa.ChunkedArray":
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(values)
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if pa.types.is_boolean(field.type):
        lowered = pc.utf8_lower(text)
        truthy, falsy = pc.is_in(lowered, pa.array(["true", "1", "yes"])), pc.is_in(lowered, pa.array(["false", "0", "no"]))
        bad = pc.and_(pc.is_valid(text), pc.invert(pc.or_(truthy, falsy)))
        _fail_rows(bad, text, field.name, source, "true/false")
        return pc.if_else(pc.is_null(text), pa.scalar(None, pa.bool_()), truthy)
    try:
        return text.cast(field.type)
    except pa.ArrowInvalid:
        parsed = [_float_or_none(v) for v in text.to_pylist()]
        bad = pa.array([v is not None and p is None for v, p in zip(text.to_pylist(), parsed, strict=True)])
        _fail_rows(bad, text, field.name, source, "a number")
        raise CatalogError(f"{source}: column {field.name} cannot be read as {field.type}") from None


def _float_or_none(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _fail_rows(bad: "pa.Array | pa.ChunkedArray", values: "pa.ChunkedArray", column: str, source: str,
               expected: str) -> None:
    import pyarrow.compute as pc

    rows = pc.indices_nonzero(bad).to_pylist()
    if rows:
        shown = ", ".join(f"row {r + 1} {values[r].as_py()!r}" for r in rows[:EXAMPLES])
        raise CatalogError(f"{source}: {len(rows):,} value(s) of {column} are not {expected} ({shown})")


def problems(table: "pa.Table") -> list[str]:
    """What makes a normalized catalog unusable, each with examples (the catalog is public, so
    its values may be named)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = []
    if table.num_rows == 0:
        return ["the catalog has no items"]
    for column in REQUIRED:
        rows = pc.indices_nonzero(pc.is_null(table.column(column))).to_pylist()
        if rows:
            found.append(f"{len(rows):,} row(s) without {column} (rows {', '.join(str(r + 1) for r in rows[:EXAMPLES])}"
                         f"{', ...' if len(rows) > EXAMPLES else ''})")
    ids = table.column("item_id")
    spaced = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(ids), ids), False)
    rows = pc.indices_nonzero(spaced.combine_chunks() if isinstance(spaced, pa.ChunkedArray) else spaced).to_pylist()
    if rows:
        found.append(f"{len(rows):,} item_id(s) with leading or trailing whitespace ("
                     + ", ".join(f"row {r + 1} {ids[r].as_py()!r}" for r in rows[:EXAMPLES])
                     + "); events must name items exactly as the catalog does")
    counts = pc.value_counts(ids.drop_null())
    repeated = [(v.as_py(), c.as_py()) for v, c in zip(counts.field("values"), counts.field("counts"), strict=True)
                if c.as_py() > 1]
    if repeated:
        repeated.sort(key=lambda vc: (-vc[1], vc[0]))
        found.append(f"{len(repeated):,} item_id(s) appear more than once ("
                     + ", ".join(f"{v!r} x{c}" for v, c in repeated[:EXAMPLES]) + (", ..." if len(repeated) > EXAMPLES else "")
                     + ")")
    price = table.column("price")
    bad_price = pc.and_(pc.is_valid(price), pc.invert(pc.and_(pc.is_finite(price), pc.greater_equal(price, 0.0))))
    rows = pc.indices_nonzero(bad_price.combine_chunks() if isinstance(bad_price, pa.ChunkedArray) else bad_price)
    rows = rows.to_pylist()
    if rows:
        found.append(f"{len(rows):,} price(s) negative or not finite ("
                     + ", ".join(f"row {r + 1} {price[r].as_py()!r}" for r in rows[:EXAMPLES]) + ")")
    return found


def zone_uri(lake: str) -> str:
    return lk.zone_uri(lake, "catalog")


def snapshot_days(lake: str) -> list[dt.date]:
    """The days of the catalog's snapshots (those with their commit file), oldest first."""
    root = lk.path(zone_uri(lake))
    days = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith("dt=") and (entry / META_FILE).is_file():
                try:
                    days.append(dt.date.fromisoformat(entry.name[3:]))
                except ValueError:
                    continue
    return sorted(days)


def snapshot_for(lake: str, day: dt.date) -> CatalogSnapshot | None:
    """The catalog in force on ``day``: its latest snapshot dated on or before it (None: the
    lake has no catalog for that day, and the pipeline falls back to private selection)."""
    earlier = [d for d in snapshot_days(lake) if d <= day]
    return read_snapshot(lake, earlier[-1]) if earlier else None


def read_snapshot(lake: str, day: dt.date) -> CatalogSnapshot:
    uri = lk.partition_uri(lake, "catalog", day)
    meta = lk.read_json(lk.path(uri) / META_FILE)
    return CatalogSnapshot(day, uri, meta["source"], meta["items"], meta["categories"], meta["sha256"])


def read_items(snapshot: CatalogSnapshot) -> "pa.Table":
    """The snapshot's items, checked against the digest recorded when it was written (a file
    replaced in the lake is refused, not used as the public item set)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = lk.path(snapshot.uri) / ITEMS_FILE
    data = path.read_bytes()  # parsed from the bytes that were hashed: no window for a swap
    digest = hashlib.sha256(data).hexdigest()
    if digest != snapshot.sha256:
        raise CatalogError(f"{path}: the catalog file changed after it was written (sha256 {digest[:12]}, "
                           f"recorded {snapshot.sha256[:12]}); load the catalog again with privrec catalog load")
    table = pq.read_table(pa.BufferReader(data), schema=schema())
    found = problems(table)  # a duplicated id would be a key released twice, with two noises
    if found:
        raise CatalogError(f"{path}: not a usable catalog: " + "; ".join(found))
    return table


def write_snapshot(lake: str, day: dt.date, table: "pa.Table", source: str) -> CatalogSnapshot:
    """Validate ``table`` and write it as the catalog from ``day`` on (replacing a snapshot of
    the same day atomically). Raises ``CatalogError`` naming every problem; nothing is written."""
    import pyarrow.parquet as pq

    from privrec_pipeline.quality.catalog_suite import validate_catalog

    table = normalize(table, source)
    found = problems(table)
    failed = validate_catalog(table)
    if found or failed:
        raise CatalogError(f"{source}: not a usable catalog: " + "; ".join(found or failed)
                           + (f" (suite catalog: {', '.join(failed)} failed)" if found and failed else ""))
    table = table.sort_by([("item_id", "ascending")])
    with lk.replacing(lk.path(lk.partition_uri(lake, "catalog", day)), last=META_FILE) as staging:
        pq.write_table(table, staging / ITEMS_FILE)
        digest = hashlib.sha256((staging / ITEMS_FILE).read_bytes()).hexdigest()
        categories = len(set(table.column("category").to_pylist()))
        (staging / META_FILE).write_text(json.dumps(
            {"source": source, "items": table.num_rows, "categories": categories, "sha256": digest,
             "columns": list(table.column_names)}, indent=2, sort_keys=True), encoding="utf-8")
    return CatalogSnapshot(day, lk.partition_uri(lake, "catalog", day), source, table.num_rows, categories, digest)


def ensure_snapshot(lake: str, day: dt.date, table: "pa.Table", source: str) -> CatalogSnapshot:
    """Write ``table`` as the catalog from ``day`` on unless the catalog in force that day
    already holds exactly these items (a generator writing the same catalog every day makes
    one snapshot)."""
    import pyarrow as pa

    current = snapshot_for(lake, day)
    table = normalize(table, source).sort_by([("item_id", "ascending")])
    if current is not None and read_items(current).equals(pa.table(table.columns, schema=schema())):
        return current
    return write_snapshot(lake, day, table, source)
