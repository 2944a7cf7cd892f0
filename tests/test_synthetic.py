"""Synthetic generator (privrec_pipeline.sources.synthetic): what the pipeline and demos rely on."""

from __future__ import annotations

import collections
import datetime as dt
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from privrec_pipeline.schema import EVENT_TYPES, MAX_RECORD_BYTES, QUARANTINE_REASONS
from privrec_pipeline.sources.synthetic import GenerationReport, GeneratorConfig, generate_day

DAY = dt.date(2026, 3, 1)
NEXT_DAY = dt.date(2026, 3, 2)
SIZES = {"events": 20_000, "users": 500, "items": 300, "seed": 7}
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
PHONE = re.compile(r"\+?\d[\d -]{7,}\d")


@dataclass(frozen=True)
class Day:
    report: GenerationReport
    lines: list[bytes]  # every landing line of the partition, without newline

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


def generate(lake: Path, date: dt.date = DAY, **overrides: object) -> Day:
    report = generate_day(GeneratorConfig(date=date, **{**SIZES, **overrides}), str(lake))
    lines = [line for f in sorted(Path(report.path).glob("*.jsonl.gz"))
             for line in gzip.decompress(f.read_bytes()).splitlines()]
    return Day(report, lines)


def file_contents(report: GenerationReport) -> dict[str, bytes]:
    return {f: gzip.decompress((Path(report.path) / f).read_bytes()) for f in report.files}


def utc(event_time: str) -> dt.datetime:
    return dt.datetime.fromisoformat(event_time).astimezone(dt.UTC)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Day:
    return generate(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="module")
def clean_next_day(tmp_path_factory: pytest.TempPathFactory) -> Day:
    return generate(tmp_path_factory.mktemp("lake"), NEXT_DAY)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> Day:
    return generate(tmp_path_factory.mktemp("lake"), bad_rate=0.05)


def test_partition_layout_and_counts(clean: Day) -> None:
    part = Path(clean.report.path)
    assert part.name == f"dt={DAY.isoformat()}"
    data_files = sorted(f.name for f in part.glob("*.jsonl.gz"))
    assert len(data_files) >= 2 and data_files == sorted(clean.report.files)
    assert json.loads((part / "_generation.json").read_text(encoding="utf-8")) == json.loads(
        clean.report.to_json())
    assert len(clean.lines) == clean.report.records == clean.report.valid_events == SIZES["events"]
    assert set(clean.report.bad_records.values()) == {0} and clean.report.duplicates == 0


def test_clean_records_follow_the_landing_contract(clean: Day) -> None:
    for event in clean.events():
        assert isinstance(event["event_id"], str) and event["event_id"]
        assert re.search(r"(Z|[+-]\d\d:\d\d)$", event["event_time"]), event
        assert utc(event["event_time"]).date() == DAY, event
        assert event["event_type"] in EVENT_TYPES
        assert isinstance(event["user_id"], str) and isinstance(event["item_id"], str)
    assert len({e["event_id"] for e in clean.events()}) == len(clean.lines)


def test_users_keep_their_identifiers_across_days(clean: Day, clean_next_day: Day) -> None:
    def identities(day: Day) -> dict[str, set[tuple[str, str, str]]]:
        out: dict[str, set[tuple[str, str, str]]] = collections.defaultdict(set)
        for e in day.events():
            out[e["user_id"]].add((e["email"], e["ip"], e["user_agent"]))
        return out

    first, second = identities(clean), identities(clean_next_day)
    assert all(len(ids) == 1 for ids in [*first.values(), *second.values()])
    shared = first.keys() & second.keys()
    assert len(shared) > 0.5 * min(len(first), len(second))
    assert all(first[u] == second[u] for u in shared)


def test_users_keep_their_tastes_across_days(clean: Day, clean_next_day: Day) -> None:
    """A user's favourite categories of one day predict the next day's: the co-occurrence a
    recommender learns beyond popularity (with independent days, about 2/24 would match)."""
    def categories(day: Day) -> dict[str, collections.Counter]:
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for e in day.events():
            out[e["user_id"]][e["category"]] += 1
        return out

    first, second = categories(clean), categories(clean_next_day)
    active = [u for u in first.keys() & second.keys() if first[u].total() >= 30 and second[u].total() >= 30]
    assert len(active) >= 20
    shares = sorted(sum(second[u][c] for c, _ in first[u].most_common(2)) / second[u].total() for u in active)
    assert shares[len(shares) // 2] > 0.4


def test_funnel(clean: Day) -> None:
    events = clean.events()
    counts = collections.Counter(e["event_type"] for e in events)
    assert counts["view"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert counts["remove_from_cart"] > 0
    carts: dict[tuple[str, str], dt.datetime] = {}
    for e in events:
        if e["event_type"] == "add_to_cart":
            key = (e["session_id"], e["item_id"])
            carts[key] = min(carts.get(key, utc(e["event_time"])), utc(e["event_time"]))
    for follow_up in ("purchase", "remove_from_cart"):
        after = [e for e in events if e["event_type"] == follow_up]
        matched = [e for e in after if (e["session_id"], e["item_id"]) in carts]
        # A small share of the carts is dropped when the day is cut to the requested size.
        assert len(matched) > 0.9 * len(after), follow_up
        assert all(utc(e["event_time"]) >= carts[(e["session_id"], e["item_id"])]
                   for e in matched), f"a {follow_up} precedes its add_to_cart"


def test_heavy_tailed_users_and_items(clean: Day) -> None:
    events = clean.events()
    per_user = sorted(collections.Counter(e["user_id"] for e in events).values(), reverse=True)
    per_item = sorted(collections.Counter(e["item_id"] for e in events).values(), reverse=True)
    top_users = SIZES["users"] // 10
    top_items = SIZES["items"] // 100
    assert sum(per_user[:top_users]) > 0.3 * len(events)
    assert sum(per_item[:top_items]) > 0.1 * len(events)


def test_some_search_queries_contain_pii(clean: Day) -> None:
    queries = [e["search_query"] for e in clean.events() if e.get("search_query")]
    with_email = [q for q in queries if EMAIL.search(q)]
    with_phone = [q for q in queries if PHONE.search(q)]
    assert with_email and with_phone
    assert len(with_email) + len(with_phone) < 0.5 * len(queries)


def test_same_seed_and_date_is_reproducible(clean: Day, tmp_path: Path) -> None:
    again = generate(tmp_path / "again")
    assert file_contents(again.report) == file_contents(clean.report)
    other = generate(tmp_path / "other", seed=SIZES["seed"] + 1)
    assert file_contents(other.report) != file_contents(clean.report)


def test_bad_rate_injects_every_quarantine_reason(dirty: Day) -> None:
    report = dirty.report
    assert set(report.bad_records) == set(QUARANTINE_REASONS)
    assert all(n > 0 for n in report.bad_records.values()), report.bad_records
    assert report.duplicates > 0
    assert len(dirty.lines) == report.records == SIZES["events"]
    assert report.valid_events + sum(report.bad_records.values()) + report.duplicates == report.records

    def decodes(line: bytes) -> bool:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert sum(not decodes(line) for line in dirty.lines) == report.bad_records["invalid_utf8"]
    assert sum(len(line) > MAX_RECORD_BYTES for line in dirty.lines) == report.bad_records[
        "oversize_record"]
    # Duplicates repeat a valid line byte for byte.
    repeats = collections.Counter(line for line in dirty.lines
                                  if decodes(line) and line.startswith(b'{"event_id":"'))
    assert sum(n - 1 for n in repeats.values()) == report.duplicates


@pytest.mark.parametrize(("field", "value"), [
    ("events", 0), ("users", 0), ("items", -1), ("files", 0), ("bad_rate", 0.7), ("bad_rate", -0.1),
])
def test_config_rejects_invalid_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(date=DAY, **{field: value})
