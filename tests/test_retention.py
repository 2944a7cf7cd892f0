"""Retention: exactly the expired partitions of the zones holding users' rows are deleted, a
landing day that was never collected is kept, DP outputs and models are kept, and what was
removed is recorded. No Spark."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.retention import DEFAULT_DAYS, enforce, retention_policy

RUN_DAY = dt.date(2026, 3, 1)


@pytest.fixture
def lake(tmp_path):
    root = str(tmp_path / "lake")
    for zone in ("landing", "bronze", "quarantine", "silver", "training", "serving", "dp_stats", "reports"):
        for age in (0, 6, 7, 8, 29, 30, 31, 400, 401):
            folder = lk.partition(root, zone, RUN_DAY - dt.timedelta(days=age))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "part-00000.parquet").write_bytes(b"rows")
    for age in (0, 6, 7, 29, 30, 31, 400, 401):  # landing 8 days old was never collected
        lk.Lake(root).write_manifest(lk.manifest_uri(root, "collect", RUN_DAY - dt.timedelta(days=age)), "{}")
    (lk.path(lk.zone_uri(root, "silver")) / "not-a-partition").mkdir()
    return root


def _ages(root: str, zone: str) -> list[int]:
    from privrec_pipeline.erasure.apply import partition_days

    return sorted((RUN_DAY - d).days for d in partition_days(root, zone))


def test_exactly_the_expired_partitions_are_removed(lake):
    report = enforce(lake, RUN_DAY, {**DEFAULT_DAYS, "landing": 7, "quarantine": 30, "bronze": 400,
                                     "silver": 400, "training": 30, "serving": 30})
    assert _ages(lake, "landing") == [0, 6, 8]  # 8 days old but never collected: kept
    assert report.kept_uncollected == [(RUN_DAY - dt.timedelta(days=8)).isoformat()]
    assert _ages(lake, "quarantine") == _ages(lake, "training") == _ages(lake, "serving") == [0, 6, 7, 8, 29]
    assert _ages(lake, "bronze") == _ages(lake, "silver") == [0, 6, 7, 8, 29, 30, 31]
    # DP outputs and reports are not per-user data: kept whole.
    assert _ages(lake, "dp_stats") == _ages(lake, "reports") == [0, 6, 7, 8, 29, 30, 31, 400, 401]
    assert (lk.path(lk.zone_uri(lake, "silver")) / "not-a-partition").exists()
    record = json.loads(lk.path(lk.manifest_uri(lake, "retention", RUN_DAY)).read_text())
    assert record["removed"]["landing"] == [(RUN_DAY - dt.timedelta(days=a)).isoformat() for a in (401, 400, 31, 30, 29, 7)]
    assert record["policy"]["landing"] == 7 and report.total == sum(len(v) for v in record["removed"].values())
    # The same run again removes nothing more.
    assert enforce(lake, RUN_DAY, report.policy).total == 0


def test_a_dry_run_removes_nothing(lake):
    report = enforce(lake, RUN_DAY, dry_run=True)
    assert report.total > 0 and _ages(lake, "landing") == [0, 6, 7, 8, 29, 30, 31, 400, 401]
    assert not lk.path(lk.manifest_uri(lake, "retention", RUN_DAY)).exists()


def test_an_old_day_rerun_keeps_what_later_days_need(lake):
    """The run of an old day counts ages from that day: nothing newer than it goes."""
    report = enforce(lake, RUN_DAY - dt.timedelta(days=30))
    assert all(dt.date.fromisoformat(d) <= RUN_DAY - dt.timedelta(days=37) for d in report.removed["landing"])
    assert 0 in _ages(lake, "landing")


def test_the_policy_comes_from_the_environment():
    assert retention_policy({}) == DEFAULT_DAYS
    assert retention_policy({"PRIVREC_RETENTION": "landing=14, quarantine=60"})["landing"] == 14
    assert retention_policy({"PRIVREC_SERVING_RETENTION_DAYS": "9"})["serving"] == 9
    for bad, message in (("landing", "is not zone=days"), ("gold=3", "is not zone=days"),
                         ("landing=0", "landing must keep a positive whole number of days"),
                         ("silver=ten", "silver must keep a positive")):
        with pytest.raises(ConfigurationError, match=message):
            retention_policy({"PRIVREC_RETENTION": bad})
