"""Per-run manifests: the record accounting of each step, written next to the data.

The collect manifest must balance: every landing record is in bronze, in quarantine,
counted as a duplicate, or counted as erased (a record of a user who asked to be forgotten:
dropped by collect, or removed later by the erasure task). A step that cannot balance fails instead of writing a manifest.

The collect and pseudonymize manifests record the key's version *and* fingerprint
(``secrets.key_fingerprint``): labels are not unique (every ``privrec keys init`` calls its
key ``v1``), fingerprints are. ``window_pseudonym_fingerprint`` is the check that a set of
days shares one pseudonym key, so that one person is one pseudonym across them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from privrec_pipeline.errors import ManifestMismatchError, PrivrecError


@dataclass
class CollectManifest:
    date: str
    interval_start: str
    interval_end: str
    run_id: str
    landing_uri: str
    landing_files: list[dict[str, Any]]
    landing_records: int
    bronze_records: int
    quarantined: dict[str, int]
    duplicates: int
    encryption_key_version: str
    bronze_uri: str
    quarantine_uri: str
    allow_empty: bool = False
    encryption_key_fingerprint: str = ""  # always set by run_collect (older manifests lack it)
    unknown_items: str = "keep"  # what collect did with items outside the catalog (keep | quarantine)
    catalog: dict[str, Any] | None = None  # the catalog snapshot checked against (day, sha256), if any
    erased: int = 0  # records of erased users (``privrec_pipeline.erasure``)
    data_keys: str = "none"  # "per-user": identifiers sealed under each user's data key (crypto-shredding)
    step: str = "collect"

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def check_balance(self) -> None:
        """landing = bronze + quarantined + duplicates + erased, or raise (records would be lost)."""
        accounted = self.bronze_records + self.quarantined_total + self.duplicates + self.erased
        if accounted != self.landing_records:
            raise ManifestMismatchError(
                f"collect {self.date}: {self.landing_records} landing records but bronze "
                f"{self.bronze_records} + quarantined {self.quarantined_total} + duplicates "
                f"{self.duplicates} + erased {self.erased} = {accounted}; refusing to commit the run"
            )

    def to_json(self) -> str:
        doc = asdict(self)
        doc["quarantined_total"] = self.quarantined_total
        doc["balanced"] = True
        return json.dumps(doc, indent=2, sort_keys=True)


@dataclass
class PseudonymizeManifest:
    date: str
    run_id: str
    bronze_records: int
    silver_records: int
    pseudonym_key_version: str
    pseudonym_key_fingerprint: str
    silver_uri: str
    columns: list[str] = field(default_factory=list)
    step: str = "pseudonymize"

    def check_balance(self) -> None:
        if self.bronze_records != self.silver_records:
            raise ManifestMismatchError(
                f"pseudonymize {self.date}: bronze has {self.bronze_records} records, silver "
                f"{self.silver_records}; refusing to commit the run"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


class PseudonymKeyMismatchError(PrivrecError):
    """Days pseudonymized under different keys (or without a recorded key) would be combined."""


class TextReader(Protocol):
    """What the manifest readers need of a file system (``lake.Lake`` has it)."""

    def exists(self, uri: str) -> bool: ...

    def read_text(self, uri: str) -> str: ...


def _pseudonym_key(fs: TextReader, lake: str, day: dt.date) -> tuple[str, str | None]:
    """(version, fingerprint or None) from the day's pseudonymize manifest."""
    from privrec_pipeline import lake as lk

    uri = lk.manifest_uri(lake, "pseudonymize", day)
    if not fs.exists(uri):
        raise PseudonymKeyMismatchError(
            f"no pseudonymize manifest for {day} ({uri}): the key its silver was pseudonymized with is unknown; "
            "run the pseudonymize step for this date")
    doc = json.loads(fs.read_text(uri))
    return str(doc.get("pseudonym_key_version")), doc.get("pseudonym_key_fingerprint") or None


def _no_fingerprint(day: dt.date, version: str) -> PseudonymKeyMismatchError:
    return PseudonymKeyMismatchError(
        f"the pseudonymize manifest of {day} records key version {version!r} but no key fingerprint (written "
        "before privrec recorded fingerprints): a label does not identify a key, so this day cannot be shown to "
        "share the pseudonym key of other days; rerun pseudonymize for this date")


def pseudonym_fingerprint(fs: TextReader, lake: str, day: dt.date) -> str:
    """The fingerprint of the pseudonym key the day's silver was written with (its manifest)."""
    version, fingerprint = _pseudonym_key(fs, lake, day)
    if fingerprint is None:
        raise _no_fingerprint(day, version)
    return fingerprint


def window_pseudonym_fingerprint(fs: TextReader, lake: str, days: Iterable[dt.date], what: str) -> str:
    """The one pseudonym key fingerprint of ``days``, or an error naming the days of each key.

    A person has a different pseudonym under each key, so a window over two keys counts them as
    two users, each clipped and bounded on its own: their privacy loss would add up across keys.
    Two keys with the same label (a recreated key file, a worker with its own file) are caught by
    the fingerprint; the same key under two labels is refused too (the key documents disagree).
    """
    by_key: dict[tuple[str, str], list[str]] = {}
    for day in days:
        version, fingerprint = _pseudonym_key(fs, lake, day)
        if fingerprint is None:
            raise _no_fingerprint(day, version)
        by_key.setdefault((version, fingerprint), []).append(day.isoformat())
    if not by_key:
        raise PseudonymKeyMismatchError(f"{what}: no day to check")
    if len(by_key) > 1:
        keys = "; ".join(f"key {v} (fingerprint {f}): {', '.join(d)}" for (v, f), d in sorted(
            by_key.items(), key=lambda kv: kv[1][0]))
        raise PseudonymKeyMismatchError(
            f"{what} spans a pseudonym key rotation: its days were pseudonymized under different keys ({keys}). "
            "One person has a different pseudonym under each key and would count as several users, multiplying "
            "their privacy loss. Rerun pseudonymize for these days with one key, or choose a window that does "
            "not span the rotation")
    return next(iter(by_key))[1]
