"""Retention: per-user data is kept only as long as it is needed.

Each zone that holds rows of users keeps its ``dt=`` partitions for a number of days
(``PRIVREC_RETENTION``, e.g. ``landing=7,quarantine=30``; defaults below). The nightly run of
day D deletes a zone's partitions of days on or before D - days, so a backfill of old days
never deletes data a later day still needs, and a rerun deletes the same. A landing partition
is deleted only once it was collected (its collect manifest exists): data that never reached
bronze is never lost to retention. DP outputs (gold/dp_stats), models, reports, manifests and
the ledger hold no rows of users and are kept.

What was removed is recorded in ``_manifests/retention/dt=D.json`` (zone, day, files) and
logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from privrec_pipeline import lake as lk
from privrec_pipeline.erasure import lake_lock
from privrec_pipeline.errors import ConfigurationError

log = logging.getLogger(__name__)
ENV = "PRIVREC_RETENTION"
DEFAULT_DAYS = {"landing": 7, "quarantine": 30, "bronze": 400, "silver": 400, "training": 30, "serving": 30}


def retention_policy(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Days kept per zone: the defaults, ``PRIVREC_SERVING_RETENTION_DAYS`` for serving, then
    ``PRIVREC_RETENTION`` (``zone=days,...``). Unknown zones and non-positive days are errors."""
    from privrec_pipeline.models.batch import retention_days

    env = os.environ if environ is None else environ
    policy = {**DEFAULT_DAYS, "serving": retention_days(dict(env))}
    raw = env.get(ENV, "").strip()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        zone, sep, value = item.partition("=")
        zone = zone.strip()
        if not sep or zone not in DEFAULT_DAYS:
            raise ConfigurationError(f"{ENV}: {item!r} is not zone=days with a zone of {', '.join(DEFAULT_DAYS)}")
        try:
            days = int(value)
        except ValueError:
            days = 0
        if days < 1:
            raise ConfigurationError(f"{ENV}: {zone} must keep a positive whole number of days, not {value.strip()!r}")
        policy[zone] = days
    return policy


def expired(lake: str, zone: str, day: dt.date, keep_days: int) -> list[dt.date]:
    """The days of ``zone``'s partitions on or before ``day - keep_days``."""
    from privrec_pipeline.erasure.apply import partition_days

    cutoff = day - dt.timedelta(days=keep_days)
    return [d for d in partition_days(lake, zone) if d <= cutoff]


@dataclass
class RetentionReport:
    day: str
    policy: dict[str, int]
    removed: dict[str, list[str]] = field(default_factory=dict)  # zone -> days
    kept_uncollected: list[str] = field(default_factory=list)  # landing days never collected

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.removed.values())


@lake_lock.step("retention")
def enforce(lake: str, day: dt.date, policy: Mapping[str, int] | None = None, *, dry_run: bool = False) -> RetentionReport:
    """Delete the expired partitions of every zone for the run of ``day`` (see the module)."""
    policy = dict(policy or retention_policy())
    report = RetentionReport(day.isoformat(), policy)
    fs = lk.Lake(lake)
    for zone, keep in policy.items():
        for old in expired(lake, zone, day, keep):
            if zone == "landing" and not fs.exists(lk.manifest_uri(lake, "collect", old)):
                report.kept_uncollected.append(old.isoformat())
                continue
            if not dry_run:
                lk.remove(lk.partition(lake, zone, old))
            report.removed.setdefault(zone, []).append(old.isoformat())
    for zone, days in report.removed.items():
        log.info("retention %s: %s %d %s partition(s) older than %d days: %s", day,
                 "would remove" if dry_run else "removed", len(days), zone, policy[zone], ", ".join(days))
    if report.kept_uncollected:
        log.warning("retention %s: kept landing of %s: never collected", day, ", ".join(report.kept_uncollected))
    if not dry_run:
        fs.write_manifest(lk.manifest_uri(lake, "retention", day), json.dumps(asdict(report), indent=2, sort_keys=True))
    return report
