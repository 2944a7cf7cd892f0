"""Removing users from every zone that holds their rows (the ``erasure`` task).

Where a user is, and how they are found:

| zone | rows of the user |
|---|---|
| landing | lines whose JSON ``user_id`` is the id (a line that is not a JSON object: the id as a JSON string anywhere in it) |
| bronze | ``user_id`` is the id |
| quarantine | sealed under one of the user's data keys (``data_key``); else the raw line, decrypted in this process, matched like landing |
| silver, training | ``user_pseudonym`` is one of the id's pseudonyms (every pseudonym key version of the key document) |
| serving | ``key`` is one of the id's pseudonyms |

A partition with such rows is rewritten whole, in a staging folder swapped in for the old
one (``lake.replacing``: atomic on a local lake), so a reader sees the old or the new
partition, never half of one. Files without the user are copied unchanged. Then the day's
manifests are set from what the partitions now hold: collect's bronze and quarantine counts
and ``erased`` (landing = bronze + quarantined + duplicates + erased), pseudonymize's bronze
and silver counts, build_partitions' users and items. Deriving them from the data, not by
subtracting, makes the task safe to kill and rerun: a rerun finds nothing more to remove and
writes the same manifests.

Then the user's data keys are deleted (``data_keys.DataKeys.shred``): what a copy of bronze or
quarantine made before still holds of them (their identifiers, their quarantined lines) can no
longer be decrypted.

DP outputs (gold/dp_stats, models) are not rewritten: a DP release bounds what any one user
changes in it, which is the guarantee an erasure relies on for them (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from privrec_pipeline import lake as lk
from privrec_pipeline.erasure.data_keys import RowKeys, ShreddedError
from privrec_pipeline.erasure.lake_lock import EXCLUSIVE, lake_lock
from privrec_pipeline.errors import ConfigurationError, PrivrecError
from privrec_pipeline.secrets import KeyRing

log = logging.getLogger(__name__)
USER_COLUMNS = {"bronze": "user_id", "silver": "user_pseudonym", "training": "user_pseudonym", "serving": "key"}


@dataclass(frozen=True)
class Targets:
    """What identifies the users to erase in each zone."""

    ids: frozenset[str]
    pseudonyms: frozenset[str]
    emails: frozenset[str] = frozenset()  # found in the users' own records (``linked``)
    sessions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, keys: KeyRing, user_ids: list[str]) -> Targets:
        from privrec_pipeline.crypto import reference_pseudonym

        versions = {**keys.pseudonym_versions, keys.pseudonym.version: keys.pseudonym}
        return cls(frozenset(user_ids), frozenset(reference_pseudonym(k.material, "user", u)
                                                  for u in user_ids for k in versions.values()))

    def line_matches(self, line: bytes) -> bool:
        """A landing or quarantined raw line of one of the users: theirs by user id, or, for a
        line without a usable user id, by one of their emails or sessions."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            user = record.get("user_id")
            if isinstance(user, str | int | float) and not isinstance(user, bool):
                return str(user) in self.ids
            if record.get("email") in self.emails or record.get("session_id") in self.sessions:
                return True
        # Not a JSON object (a truncated or broken line), or no usable user id: any of the
        # users' identifiers as a JSON string anywhere in the line.
        return any(token in line for value in self.ids | self.emails | self.sessions
                   for token in {json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()})


@dataclass
class Erased:
    """Rows removed, per zone and day."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    keys: int = 0  # data keys deleted (crypto-shredding)

    def add(self, zone: str, day: dt.date, n: int) -> None:
        if n:
            per_day = self.rows.setdefault(zone, {})
            per_day[day.isoformat()] = per_day.get(day.isoformat(), 0) + n

    @property
    def total(self) -> int:
        return sum(n for days in self.rows.values() for n in days.values())

    def by_zone(self) -> dict[str, int]:
        return {zone: sum(days.values()) for zone, days in sorted(self.rows.items())}


def partition_days(lake: str, zone: str) -> list[dt.date]:
    """The days of a zone's ``dt=`` partitions (other folders are left alone)."""
    root = lk.path(lk.zone_uri(lake, zone))
    days = []
    for folder in root.iterdir() if root.exists() else []:
        if folder.is_dir() and folder.name.startswith("dt="):
            try:
                days.append(dt.date.fromisoformat(folder.name.removeprefix("dt=")))
            except ValueError:
                continue
    return sorted(days)


def linked(lake: str, keys: KeyRing, targets: Targets, row_keys: RowKeys) -> Targets:
    """``targets`` with the emails and sessions of the users' own records (landing lines and
    bronze rows with their user id; bronze's identifiers decrypted here): a malformed line of
    theirs may carry those but no user id."""
    import pyarrow.compute as pc

    from privrec_pipeline.transforms.collect import IDENTIFIERS_CONTEXT

    emails, sessions = set(), set()
    for day in partition_days(lake, "landing"):
        for line in _landing_lines(lk.partition(lake, "landing", day)):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and str(record.get("user_id")) in targets.ids:
                emails.add(record.get("email"))
                sessions.add(record.get("session_id"))
    for day in partition_days(lake, "bronze"):
        folder = lk.partition(lake, "bronze", day)
        if not lk.files(folder):
            continue
        dataset = lk.dataset(folder, format="parquet")
        columns = ["user_id", "event_id", "session_id", "identifiers_enc", "enc_key_version"]
        table = dataset.to_table(columns=columns + [c for c in ("data_key",) if c in dataset.schema.names],
                                 filter=pc.field("user_id").isin(sorted(targets.ids)))
        for row in table.to_pylist():
            sessions.add(row["session_id"])
            if row["identifiers_enc"] is not None:
                try:
                    plain = row_keys.open(row["enc_key_version"], row.get("data_key"), row["identifiers_enc"],
                                          f"{IDENTIFIERS_CONTEXT}|{row['event_id']}".encode())
                except ShreddedError:  # a copy left by an earlier erasure of theirs: unreadable already
                    continue
                emails.add(json.loads(plain).get("email"))
    return Targets(targets.ids, targets.pseudonyms,
                   frozenset(e for e in emails if isinstance(e, str) and e),
                   frozenset(s for s in sessions if isinstance(s, str) and s))


def _landing_lines(folder: lk.UPath) -> list[bytes]:
    from privrec_pipeline.ingest import LANDING_SUFFIXES

    lines: list[bytes] = []
    for f in lk.files(folder):
        if f.name.endswith(LANDING_SUFFIXES) and not f.name.startswith((".", "_")):
            data = f.read_bytes()
            lines += (gzip.decompress(data) if f.name.endswith(".gz") else data).splitlines()
    return lines


def erase_users(lake: str, keys: KeyRing, targets: Targets, row_keys: RowKeys) -> Erased:
    """Remove every row of the ``targets`` users from landing, bronze, quarantine, silver,
    training and serving, and reconcile the manifests of the days touched."""
    erased = Erased()
    for day in partition_days(lake, "landing"):
        erased.add("landing", day, erase_landing(lk.partition(lake, "landing", day), targets))
    for day in partition_days(lake, "bronze"):
        erased.add("bronze", day, erase_parquet(lk.partition(lake, "bronze", day), _column_in("user_id", targets.ids)))
    for day in partition_days(lake, "quarantine"):
        erased.add("quarantine", day, erase_parquet(lk.partition(lake, "quarantine", day),
                                                                  _quarantined_of(keys, targets, row_keys)))
    for zone in ("silver", "training", "serving"):
        for day in partition_days(lake, zone):
            erased.add(zone, day, erase_parquet(lk.partition(lake, zone, day),
                                                _column_in(USER_COLUMNS[zone], targets.pseudonyms)))
    for day in sorted({dt.date.fromisoformat(d) for days in erased.rows.values() for d in days}):
        reconcile_manifests(lake, day)
    return erased


# ---- partitions -----------------------------------------------------------------------------

def erase_landing(folder: lk.UPath, targets: Targets) -> int:
    """Drop the users' lines from a landing partition's files (gzip kept gzip)."""
    from privrec_pipeline.ingest import LANDING_SUFFIXES

    rewritten: dict[str, bytes] = {}
    removed = 0
    for f in lk.files(folder):
        if not f.name.endswith(LANDING_SUFFIXES) or f.name.startswith((".", "_")):
            continue
        data = f.read_bytes()
        packed = f.name.endswith(".gz")
        text = gzip.decompress(data) if packed else data
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if not (line.strip() and targets.line_matches(line.rstrip(b"\r\n")))]
        if len(kept) != len(lines):
            removed += len(lines) - len(kept)
            body = b"".join(kept)
            rewritten[f.relative_to(folder).as_posix()] = gzip.compress(body, mtime=0) if packed else body
    if removed:
        _replace_files(folder, rewritten)
    return removed


def erase_parquet(folder: lk.UPath, drop: Matcher) -> int:
    """Drop the rows ``drop`` marks from every Parquet file under ``folder`` (files without the
    columns it needs are kept as they are); the partition is swapped whole."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rewritten: dict[str, bytes] = {}
    removed = 0
    for f in lk.files(folder):
        if not f.name.endswith(".parquet") or f.name.startswith((".", "_")):
            continue
        with f.open("rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = set(parquet.schema_arrow.names)
            if not set(drop.columns) <= names:
                continue
            # The columns the match needs first; the whole file only when it holds the users.
            mask = drop(parquet.read(columns=[*drop.columns, *(c for c in drop.optional if c in names)]))
            n = int(pc.sum(mask).as_py() or 0)
            if not n:
                continue
            table = parquet.read()
            # Spark writes timestamps as INT96: written back the same way, or Spark would read
            # pyarrow's nanoseconds as another type than the untouched files' (a failed read).
            int96 = any(c.physical_type == "INT96" for c in parquet.schema)
        removed += n
        buffer = io.BytesIO()
        pq.write_table(table.filter(pc.invert(mask)), buffer, compression="snappy",
                       use_deprecated_int96_timestamps=int96, coerce_timestamps=None if int96 else "us")
        rewritten[f.relative_to(folder).as_posix()] = buffer.getvalue()
    if removed:
        _replace_files(folder, rewritten)
    return removed


def _replace_files(folder: lk.UPath, rewritten: dict[str, bytes]) -> None:
    """``folder`` with the files of ``rewritten`` replaced, swapped in whole. A rewritten
    file's Hadoop checksum (``.<name>.crc``) is dropped: it would no longer match."""
    stale = {f"{rel.rsplit('/', 1)[0] + '/' if '/' in rel else ''}.{rel.rsplit('/', 1)[-1]}.crc" for rel in rewritten}
    originals = {f.relative_to(folder).as_posix(): f for f in lk.files(folder)}
    with lk.replacing(folder) as stage:
        for rel, f in originals.items():
            if rel in stale:
                continue
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(rewritten[rel] if rel in rewritten else f.read_bytes())


@dataclass(frozen=True)
class Matcher:
    """Which rows of a Parquet file are the users': ``columns`` it reads (and ``optional``
    ones where the file has them), ``mark`` a boolean array over a table of those columns."""

    columns: tuple[str, ...]
    mark: Callable[[Any], Any]
    optional: tuple[str, ...] = ()

    def __call__(self, table: Any) -> Any:
        return self.mark(table)


def _column_in(column: str, values: frozenset[str]) -> Matcher:
    import pyarrow as pa
    import pyarrow.compute as pc

    return Matcher((column,), lambda table: pc.fill_null(
        pc.is_in(table[column].cast(pa.string()), value_set=pa.array(sorted(values))), False))


def _quarantined_of(keys: KeyRing, targets: Targets, row_keys: RowKeys) -> Matcher:
    """Marks quarantine rows of the users: sealed under one of their data keys, or with a
    decrypted raw line that is theirs (a line without a user id, or another user's line that
    names them). A row whose data key is gone was an erased user's: it goes too. A row that
    does not decrypt stops the erasure: it cannot be shown not to be theirs."""
    import pyarrow as pa
    from cryptography.exceptions import InvalidTag

    from privrec_pipeline.erasure.requests import fingerprint
    from privrec_pipeline.transforms.collect import raw_record_aad

    theirs = {(v, fingerprint(k.material, u)) for u in targets.ids for v, k in keys.encryption_keys.items()}

    def drop(table: Any) -> Any:
        rows = table.to_pylist()
        row_keys.prefetch((r["enc_key_version"], r.get("data_key")) for r in rows)
        marks = []
        for row in rows:
            if row["raw_record_enc"] is None:
                marks.append(False)
                continue
            if (row["enc_key_version"], row.get("data_key")) in theirs:
                marks.append(True)
                continue
            place = f"{row['source_file']}#{row['record_position']}"
            try:
                line = row_keys.open(row["enc_key_version"], row.get("data_key"), row["raw_record_enc"],
                                     raw_record_aad(row["source_file"], row["record_position"]))
            except ShreddedError:
                marks.append(True)
                continue
            except ConfigurationError as exc:
                raise PrivrecError(f"quarantine row {place}: {exc}") from None
            except InvalidTag:
                raise PrivrecError(f"quarantine row {place} does not decrypt (wrong key, or the file was "
                                   "altered): erasure stopped") from None
            marks.append(targets.line_matches(line))
        return pa.array(marks, pa.bool_())

    return Matcher(("raw_record_enc", "enc_key_version", "source_file", "record_position"), drop, ("data_key",))


# ---- manifests ------------------------------------------------------------------------------

def _rows(folder: lk.UPath, where: str | None = None) -> int:
    """Rows of the Parquet files under ``folder`` (only those under ``where``/ if given)."""
    import pyarrow.parquet as pq

    total = 0
    for f in lk.files(folder):
        rel = f.relative_to(folder).as_posix()
        if f.name.endswith(".parquet") and not f.name.startswith((".", "_")) and (where is None or rel.startswith(where)):
            with f.open("rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
    return total


def reconcile_manifests(lake: str, day: dt.date) -> None:
    """Set a day's collect, pseudonymize and build_partitions manifests from what its
    partitions hold now (after an erasure); a manifest that does not exist is left absent."""
    import pyarrow.compute as pc

    fs = lk.Lake(lake)
    collect_uri = lk.manifest_uri(lake, "collect", day)
    erased = 0
    if fs.exists(collect_uri):
        doc = json.loads(fs.read_text(collect_uri))
        doc["bronze_records"] = _rows(lk.partition(lake, "bronze", day))
        by_reason: dict[str, int] = dict.fromkeys(doc["quarantined"], 0)
        quarantine = lk.partition(lake, "quarantine", day)
        if quarantine.exists() and lk.files(quarantine):
            counts = lk.dataset(quarantine, format="parquet").to_table(columns=["reason"])["reason"].value_counts()
            by_reason.update({c["values"].as_py(): c["counts"].as_py() for c in counts})
        doc["quarantined"] = by_reason
        doc["quarantined_total"] = sum(by_reason.values())
        erased = doc["landing_records"] - doc["bronze_records"] - doc["quarantined_total"] - doc["duplicates"]
        if erased < 0:
            raise PrivrecError(f"collect manifest of {day}: bronze and quarantine hold more records than landed "
                               f"({-erased} more); the partitions were changed outside privrec")
        doc["erased"] = erased
        fs.write_manifest(collect_uri, json.dumps(doc, indent=2, sort_keys=True))
    pseudonymize_uri = lk.manifest_uri(lake, "pseudonymize", day)
    if fs.exists(pseudonymize_uri):
        doc = json.loads(fs.read_text(pseudonymize_uri))
        doc["bronze_records"] = _rows(lk.partition(lake, "bronze", day))
        doc["silver_records"] = _rows(lk.partition(lake, "silver", day))
        doc["erased"] = erased
        fs.write_manifest(pseudonymize_uri, json.dumps(doc, indent=2, sort_keys=True))
    partitions_uri = lk.manifest_uri(lake, "build_partitions", day)
    training = lk.partition(lake, "training", day)
    if fs.exists(partitions_uri) and training.exists():
        doc = json.loads(fs.read_text(partitions_uri))
        for k in doc["partitions"]:
            shard = training / f"partition={k}"
            users = lk.dataset(shard, format="parquet").to_table(columns=["user_pseudonym"])["user_pseudonym"]
            doc["partitions"][k] = {"users": int(pc.count_distinct(users).as_py()), "items": len(users)}
        held = lk.dataset(training / "holdout", format="parquet").to_table(columns=["user_pseudonym", "trained"])
        doc["holdout"] = {
            "held_out_users": int(pc.count_distinct(held.filter(pc.invert(held["trained"]))["user_pseudonym"]).as_py()),
            "evaluated_training_users": int(pc.count_distinct(held.filter(held["trained"])["user_pseudonym"]).as_py()),
        }
        fs.write_manifest(partitions_uri, json.dumps(doc, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Processed:
    request_id: int
    erased: dict[str, int]  # rows removed per zone


def process_pending(lake: str, keys: KeyRing, register: Any = None) -> list[Processed]:
    """Erase the user of every pending request, one request at a time, and mark it completed
    (its encrypted id deleted). A request is completed only after its user is gone from every
    zone; a task killed halfway leaves it pending, and the next run repeats it (idempotent)."""
    from privrec_pipeline.erasure.requests import PENDING, open_register

    register = register or open_register(lake)
    if not register.requests(PENDING):
        return []  # the nightly case: no lock taken, no step kept waiting
    # Alone on the lake: no step is between reading users' rows and writing them (lake_lock).
    with lake_lock(lake, EXCLUSIVE, what="the erasure task", url=register.url):
        return _process(lake, keys, register)


def _process(lake: str, keys: KeyRing, register: Any) -> list[Processed]:
    row_keys = RowKeys(keys, register.data_keys)
    done = []
    for request, user_id in list(register.pending_ids(keys)):
        targets = linked(lake, keys, Targets.of(keys, [user_id]), row_keys)
        register.link(request.id, keys, targets.emails)  # before any row goes: collect keeps them out from now on
        erased = erase_users(lake, keys, targets, row_keys)
        # The rows are gone; now every copy of them elsewhere (backups, snapshots) too.
        shredded = register.data_keys.shred(keys, [user_id])
        erased.keys = shredded
        summary = erased.by_zone()
        register.complete(request.id, {"rows": erased.rows, "total": erased.total, "data_keys": erased.keys})
        # Zones only: how many rows one person had is theirs to know (``privrec erase --status``).
        log.info("erasure request %d completed: %s", request.id,
                 f"rows removed from {', '.join(summary)}" if summary else "no rows found in any zone")
        done.append(Processed(request.id, summary))
    return done
