"""The privacy ledger: every DP release, reserved before it is computed, kept forever.

One row per release attempt in ``privacy_releases``: what is released (``release_key``) from
which data window (``window_start`` .. ``window_end``, UTC days, inclusive), by which DAG run,
with which mechanisms (``accounting.Component`` list as JSON), its own (epsilon, delta), its
state (reserved -> committed | failed), the canonical description of what it computes and
that description's SHA-256, and its lease (which run may compute and commit it, until
when). A SQLAlchemy URL selects the database: the default is a SQLite file in the lake,
production uses any server (PostgreSQL is tested).

Budget policy (privacy contract points 3 and 4): for every window of ``window_days``
consecutive days, the tight composition (PLD) of all reserved or committed releases whose
data windows intersect it must stay within (epsilon, delta). A user's data of day d is used
by exactly the releases whose data windows contain d, so this caps every user's loss over
any rolling window. ``reserve`` checks every policy window the new release touches, and,
with ``lifetime_epsilon`` set, the composition of every release ever made (a user present on
every day is in all of them).

Concurrency: each mutation runs in one transaction whose first statement updates the single
row of ``privacy_ledger_lock``; on PostgreSQL that row lock, on SQLite the database write
lock, serializes them, so two runs cannot both take the last of the budget.

Resumes prove what they spend. A reservation stores the canonical description of the
release (mechanisms, epsilon, delta, window and the caller's parameters: contribution
bounds, sensitivities, noise plan, key fingerprint). A run that continues a reserved release
(its own retry, or a takeover) must present the same description (same hash), else
``ReleaseMismatch`` names both: computing with other parameters would spend what the ledger
does not hold.

Leases (one run computes a release). The run that reserves a release holds its lease for
``lease_seconds``; its retries (same run id) renew it. Another run of the same release
fails with ``ReleaseInProgress`` while the lease is live, and takes the reservation over
once it has expired (the owner died). ``commit`` and ``fail`` check that the caller still
holds the lease (``LeaseLost`` otherwise), and ``commit(publish=...)`` swaps the output in
while holding the ledger lock, so a run whose lease was taken over can never publish: the
output of a release is written by exactly one run.

Idempotence: a run that reserves again gets its own release back, as ``"resume"`` while
still reserved or ``"reuse"`` once committed, forced or not. Without force, another run gets
an open reservation (``"resume"``, already counted, subject to its lease) or the latest
committed release (``"reuse"``, nothing spent). ``force=True`` makes a new release of the
same window, which spends again (a deliberate re-release is a new release).

Integrity: every mutation also appends an entry to ``privacy_ledger_entries``, an
append-only hash chain (entry i holds SHA-256 of entry i-1 and of its own content, the
release row as it is after the change); the lock row keeps the chain's head. Database
triggers refuse updates and deletions of entries and deletions of releases. ``verify``
replays the chain and compares it with the release rows and the head, so deleting or editing
a row (which would reset a budget), an entry or the tail of the chain is detected; every
mutation verifies first and fails closed (``LedgerIntegrityError``). An attacker who can
rewrite the whole database consistently (every row, entry and the head) is not detected:
export the head (``privrec budget --verify`` prints it) to a place they cannot write.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from privrec_pipeline.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerIntegrityError,
    PrivacyBudgetExceeded,
    PrivrecError,
    ReleaseInProgress,
    ReleaseMismatch,
)
from privrec_pipeline.privacy.accounting import Component, basic_composition, composed_epsilon

log = logging.getLogger(__name__)
RESERVED, COMMITTED, FAILED = "reserved", "committed", "failed"
GENESIS = "0" * 64
DEFAULT_LEASE_SECONDS = 2 * 3600
ENV_LEASE_SECONDS = "PRIVREC_LEASE_SECONDS"
metadata = MetaData()
releases = Table(
    "privacy_releases", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("release_key", String(200), nullable=False),
    Column("window_start", Date, nullable=False),
    Column("window_end", Date, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("mechanism", Text, nullable=False),  # JSON: list of Component dicts
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("forced", Integer, nullable=False, default=0),
    Column("reserved_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("result", Text),  # JSON: where the release is, or why it failed
    Column("description", Text),  # canonical JSON of what the release computes
    Column("description_hash", String(64)),  # SHA-256 of description
    Column("lease_owner", String(250)),  # the run that may compute and commit it
    Column("lease_until", DateTime(timezone=True)),
    UniqueConstraint("release_key", "window_start", "window_end", "generation", name="uq_release_generation"),
)
entries = Table(
    "privacy_ledger_entries", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("release_id", Integer, nullable=False),
    Column("event", String(16), nullable=False),  # reserved, takeover, renewed, committed, failed, imported
    Column("body", Text, nullable=False),  # canonical JSON of the release row after the event
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
lock = Table("privacy_ledger_lock", metadata, Column("id", Integer, primary_key=True), Column("version", Integer),
             Column("head_seq", Integer), Column("head_hash", String(64)),
             Column("chain_started", Integer))  # 1 once the rows of a pre-chain ledger were imported
APPEND_ONLY = "the privacy ledger is append-only"
CHAIN_COLUMNS = tuple(c.name for c in releases.columns)  # what an entry's body records, fixed
SCHEMA_LOCK_ID = 7_201_426  # pg_advisory_xact_lock key of the schema migration


@dataclass(frozen=True)
class BudgetPolicy:
    epsilon: float = 10.0
    delta: float = 1e-6
    window_days: int = 30
    lifetime_epsilon: float | None = None
    """Optional cap on the composition of all releases ever made (at ``delta``), beside the
    rolling window."""

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1 or self.window_days < 1:
            raise ConfigurationError(f"invalid budget policy {self}: need epsilon > 0, 0 < delta < 1, window >= 1 day")
        if self.lifetime_epsilon is not None and not self.lifetime_epsilon >= self.epsilon:
            raise ConfigurationError(f"invalid budget policy {self}: lifetime_epsilon must be at least the window's "
                                     f"epsilon {self.epsilon:g}")


@dataclass(frozen=True)
class Release:
    id: int
    release_key: str
    window_start: dt.date
    window_end: dt.date
    generation: int
    dag_id: str
    run_id: str
    components: list[Component]
    epsilon: float
    delta: float
    state: str
    forced: bool
    reserved_at: dt.datetime
    finished_at: dt.datetime | None
    result: dict[str, Any] | None
    description: dict[str, Any] | None = None
    description_hash: str | None = None
    lease_owner: str | None = None
    lease_until: dt.datetime | None = None

    def overlaps(self, start: dt.date, end: dt.date) -> bool:
        return self.window_start <= end and start <= self.window_end

    @property
    def owner(self) -> str:
        """The run that may compute and commit this release."""
        return self.lease_owner or self.run_id


@dataclass(frozen=True)
class Reservation:
    release: Release
    status: str  # "new" (spent now), "resume" (open reservation, already counted), "reuse" (committed)

    @property
    def spends(self) -> bool:
        return self.status == "new"


@dataclass(frozen=True)
class WindowSpend:
    start: dt.date
    end: dt.date
    releases: list[Release]
    epsilon: float  # tight (PLD) at the policy delta
    basic_epsilon: float
    basic_delta: float
    policy: BudgetPolicy

    @property
    def remaining(self) -> float:
        return self.policy.epsilon - self.epsilon


def canonical_json(doc: Any) -> str:
    """One byte string per document (sorted keys, no spaces, no NaN): what hashes are taken of."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        raise ConfigurationError("a release description must not hold NaN or infinite numbers") from None


def sha256_hex(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _stable(value: Any) -> Any:
    """Floats to 12 significant digits: derived numbers (a calibrated sigma, a PLD epsilon) can
    differ in their last bits between machines and library builds, and a takeover on another
    worker must still recognise the reserved release."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_stable(v) for v in value]
    return value


def describe(release_key: str, window_start: dt.date, window_end: dt.date, components: list[Component],
             epsilon: float, delta: float, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The canonical description of a release: everything that decides its noise and cost."""
    return _stable({"release_key": release_key, "window": [window_start.isoformat(), window_end.isoformat()],
                    "mechanisms": [c.to_dict() for c in components], "epsilon": epsilon, "delta": delta,
                    "parameters": json.loads(canonical_json(parameters or {}))})


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{path}.{key}" if path else key)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: reserved {json.dumps(old, default=str)}, now {json.dumps(new, default=str)}"]


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes (written in UTC), PostgreSQL aware ones."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _row(row: Any) -> Release:
    m = row._mapping
    return Release(
        id=m["id"], release_key=m["release_key"], window_start=m["window_start"], window_end=m["window_end"],
        generation=m["generation"], dag_id=m["dag_id"], run_id=m["run_id"],
        components=[Component.from_dict(c) for c in json.loads(m["mechanism"])],
        epsilon=m["epsilon"], delta=m["delta"], state=m["state"], forced=bool(m["forced"]),
        reserved_at=_utc(m["reserved_at"]), finished_at=_utc(m["finished_at"]),
        result=json.loads(m["result"]) if m["result"] else None,
        description=json.loads(m["description"]) if m["description"] else None,
        description_hash=m["description_hash"], lease_owner=m["lease_owner"], lease_until=_utc(m["lease_until"]),
    )


def _row_body(row: Any) -> dict[str, Any]:
    """A release row as the chain records it (dates and times as UTC ISO strings): the columns
    of ``CHAIN_COLUMNS`` only, so a column added by a later version does not change the bodies
    of entries written before it."""
    out: dict[str, Any] = {}
    for name in CHAIN_COLUMNS:
        value = row._mapping[name]
        if isinstance(value, dt.datetime):
            value = _utc(value).isoformat()
        elif isinstance(value, dt.date):
            value = value.isoformat()
        out[name] = value
    return out


def _entry_hash(prev_hash: str, seq: int, release_id: int, event: str, body: str) -> str:
    return sha256_hex(f"{prev_hash}\n{seq}\n{release_id}\n{event}\n{body}")


def database_engine(url: str) -> Engine:
    """An engine on the ledger's database (SQLite: wait for the write lock, don't fail). Its
    error messages never show bound parameters: they can be wrapped data keys or encrypted ids,
    and a task's traceback goes to its log."""
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    return create_engine(url, **kwargs)


def with_ddl_retries(prepare: Callable[[], None], attempts: int = 5) -> None:
    """Run a schema preparation, again when it loses a race with another process's DDL
    (SQLite; on PostgreSQL ``schema_lock`` serializes them)."""
    for attempt in range(attempts):
        try:
            prepare()
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise


def schema_lock(conn: Connection) -> None:
    """On PostgreSQL, the transaction-scoped advisory lock every schema change takes."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_ID})"))


class Ledger:
    def __init__(self, url: str, policy: BudgetPolicy | None = None, *, lease_seconds: float | None = None) -> None:
        self.url = url
        self.policy = policy or BudgetPolicy()
        try:
            self.lease_seconds = float(lease_seconds if lease_seconds is not None
                                       else os.environ.get(ENV_LEASE_SECONDS, DEFAULT_LEASE_SECONDS))
        except ValueError:
            raise ConfigurationError(f"{ENV_LEASE_SECONDS} must be a number of seconds, not "
                                     f"{os.environ.get(ENV_LEASE_SECONDS)!r}") from None
        self.engine: Engine = database_engine(url)
        with_ddl_retries(self._prepare)

    # -- schema -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Create or migrate the schema in one transaction. On PostgreSQL an advisory lock
        serializes workers that start together (their DDL would race); SQLite's DDL is
        retried by the caller."""
        with self.engine.begin() as conn:
            schema_lock(conn)
            metadata.create_all(conn)
            self._add_missing_columns(conn)
            if conn.execute(select(lock.c.id)).first() is None:
                conn.execute(insert(lock).values(id=1, version=0, head_seq=0, head_hash=GENESIS, chain_started=0))
            self._append_only_triggers(conn)
        with self._locked() as conn:  # serialized: one worker imports a pre-chain ledger's rows, once
            state = conn.execute(select(lock.c.head_seq, lock.c.chain_started).where(lock.c.id == 1)).one()
            if state.head_seq is None:  # the chain columns were just added to an old lock row
                conn.execute(update(lock).where(lock.c.id == 1).values(head_seq=0, head_hash=GENESIS))
            if not state.chain_started:
                for row in conn.execute(select(releases).order_by(releases.c.id)).all():
                    self._append(conn, row.id, "imported")
                conn.execute(update(lock).where(lock.c.id == 1).values(chain_started=1))

    def _add_missing_columns(self, conn: Connection) -> None:
        inspector = inspect(conn)
        for table in (releases, lock):
            present = {c["name"] for c in inspector.get_columns(table.name)}
            missing = [c for c in table.columns if c.name not in present]
            for column in missing:
                kind = column.type.compile(dialect=self.engine.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))

    def _append_only_triggers(self, conn: Connection) -> None:
        guarded = [("privacy_ledger_entries", "UPDATE"), ("privacy_ledger_entries", "DELETE"),
                   ("privacy_releases", "DELETE")]
        if self.engine.dialect.name == "sqlite":
            for table, op in guarded:
                conn.execute(text(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"))
        elif self.engine.dialect.name == "postgresql":
            statement_level = [("privacy_ledger_entries", "TRUNCATE"), ("privacy_releases", "TRUNCATE")]
            present = {r[0] for r in conn.execute(text(
                "select tgname from pg_trigger t join pg_class c on c.oid = t.tgrelid "
                "where c.relname in ('privacy_ledger_entries', 'privacy_releases') "
                "and pg_table_is_visible(c.oid)"))}
            if len(present) < len(guarded) + len(statement_level):
                conn.execute(text(
                    "CREATE OR REPLACE FUNCTION privrec_ledger_append_only() RETURNS trigger "
                    f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{APPEND_ONLY} (% on %)', TG_OP, "
                    "TG_TABLE_NAME; END $$"))
                for (table, op), level in [*((g, "ROW") for g in guarded),
                                           *((g, "STATEMENT") for g in statement_level)]:
                    conn.execute(text(
                        f"CREATE OR REPLACE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                        f"FOR EACH {level} EXECUTE FUNCTION privrec_ledger_append_only()"))

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        """A transaction that holds the ledger's write lock from its first statement."""
        with self.engine.begin() as conn:
            conn.execute(update(lock).where(lock.c.id == 1).values(version=lock.c.version + 1))
            yield conn

    # -- the hash chain -----------------------------------------------------------------
    def _append(self, conn: Connection, release_id: int, event: str) -> None:
        row = conn.execute(select(releases).where(releases.c.id == release_id)).one()
        head = conn.execute(select(lock.c.head_seq, lock.c.head_hash).where(lock.c.id == 1)).one()
        seq, body = head.head_seq + 1, canonical_json(_row_body(row))
        digest = _entry_hash(head.head_hash, seq, release_id, event, body)
        conn.execute(insert(entries).values(seq=seq, release_id=release_id, event=event, body=body,
                                            prev_hash=head.head_hash, hash=digest))
        conn.execute(update(lock).where(lock.c.id == 1).values(head_seq=seq, head_hash=digest))

    def _problems(self, conn: Connection) -> list[str]:
        problems: list[str] = []
        prev, expected_seq, latest = GENESIS, 1, {}
        for e in conn.execute(select(entries).order_by(entries.c.seq)):
            if e.seq != expected_seq:
                problems.append(f"entry {expected_seq} is missing (next entry is {e.seq})")
            if e.prev_hash != prev:
                problems.append(f"entry {e.seq} does not follow its predecessor (the chain was cut or edited)")
            if _entry_hash(e.prev_hash, e.seq, e.release_id, e.event, e.body) != e.hash:
                problems.append(f"entry {e.seq} (release {e.release_id}, {e.event}) was edited")
            prev, expected_seq, latest[e.release_id] = e.hash, e.seq + 1, e.body
        head = conn.execute(select(lock.c.head_seq, lock.c.head_hash).where(lock.c.id == 1)).one()
        if (head.head_seq, head.head_hash) != (expected_seq - 1, prev):
            problems.append(f"the chain ends at entry {expected_seq - 1}, but its head says entry {head.head_seq}: "
                            "entries were deleted from its end")
        rows = {r.id: canonical_json(_row_body(r)) for r in conn.execute(select(releases))}
        for rid in sorted(set(latest) - set(rows)):
            problems.append(f"release {rid} is in the chain but was deleted from privacy_releases")
        for rid in sorted(set(rows) - set(latest)):
            problems.append(f"release {rid} is in privacy_releases but not in the chain (inserted outside privrec)")
        for rid in sorted(set(rows) & set(latest)):
            if rows[rid] != latest[rid]:
                changed = [d.split(":")[0] for d in _differences(json.loads(latest[rid]), json.loads(rows[rid]))]
                problems.append(f"release {rid} was edited outside privrec ({', '.join(changed)})")
        return problems

    def verify(self) -> tuple[list[str], int, str]:
        """(problems, entries, head hash): problems is empty when the chain, the head and every
        release row agree."""
        with self._locked() as conn:  # one consistent view: no mutation lands between the reads
            head = conn.execute(select(lock.c.head_seq, lock.c.head_hash).where(lock.c.id == 1)).one()
            return self._problems(conn), head.head_seq, head.head_hash

    def _require_intact(self, conn: Connection) -> None:
        problems = self._problems(conn)
        if problems:
            raise LedgerIntegrityError(
                f"the privacy ledger at {self.engine.url.render_as_string(hide_password=True)} does not verify: "
                + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                + ". Nothing is reserved or committed until it is restored from a backup (`privrec budget --verify` "
                "lists every problem)")

    # -- reading ------------------------------------------------------------------------
    def _all(self, conn: Connection) -> list[Release]:
        return [_row(r) for r in conn.execute(select(releases).order_by(releases.c.id))]

    def releases(self) -> list[Release]:
        with self.engine.connect() as conn:
            return self._all(conn)

    def _get(self, conn: Connection, release_id: int) -> Release:
        row = conn.execute(select(releases).where(releases.c.id == release_id)).first()
        if row is None:
            raise PrivrecError(f"no release {release_id} in the ledger")
        return _row(row)

    # -- reservations -------------------------------------------------------------------
    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)  # leases and audit times only; no data decision uses it

    def _lease_live(self, release: Release, now: dt.datetime) -> bool:
        return release.lease_until is not None and release.lease_until > now

    def _check_description(self, release: Release, description: dict[str, Any], digest: str, run_id: str) -> None:
        if release.description_hash == digest:
            return
        what = f"release {release.id} ({release.release_key} of {release.window_start}..{release.window_end})"
        if release.description is None:
            detail = "it was reserved before privrec recorded release descriptions, so nothing proves what it covers"
        else:
            diffs = _differences(release.description, description)
            detail = "; ".join(diffs[:8]) + (f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise ReleaseMismatch(
            f"{what} was reserved by run {release.run_id} (description {release.description_hash or 'none'}); run "
            f"{run_id} would compute something else (description {digest}): {detail}. Continuing it would spend what "
            "the ledger does not hold. Rerun with the reserved settings, or set force_release to make (and pay for) "
            "a new release")

    def _hold(self, conn: Connection, release: Release, run_id: str, now: dt.datetime, event: str) -> Release:
        conn.execute(update(releases).where(releases.c.id == release.id).values(
            lease_owner=run_id, lease_until=now + dt.timedelta(seconds=self.lease_seconds)))
        self._append(conn, release.id, event)
        return self._get(conn, release.id)

    def reserve(self, release_key: str, window_start: dt.date, window_end: dt.date, components: list[Component],
                *, epsilon: float, delta: float, dag_id: str, run_id: str, force: bool = False,
                parameters: dict[str, Any] | None = None) -> Reservation:
        """Reserve the cost of a release before computing it (see the module docstring).
        ``parameters``: what else decides the release's noise (bounds, sensitivities, plan, key
        fingerprint); part of the description a resume must match."""
        if window_end < window_start:
            raise ConfigurationError(f"data window ends ({window_end}) before it starts ({window_start})")
        if not components:
            raise ConfigurationError("a release needs at least one mechanism")
        description = describe(release_key, window_start, window_end, components, epsilon, delta, parameters)
        digest = sha256_hex(canonical_json(description))
        with self._locked() as conn:
            self._require_intact(conn)
            now = self._now()
            everything = self._all(conn)
            same = [r for r in everything if r.release_key == release_key
                    and (r.window_start, r.window_end) == (window_start, window_end)]
            latest = same[-1] if same else None
            # A retried task (same run) continues its own attempt, forced or not.
            mine = [r for r in same if r.state in (RESERVED, COMMITTED) and run_id in (r.run_id, r.lease_owner)]
            candidates = mine or ([] if force else [r for r in same if r.state == RESERVED])
            if candidates and candidates[-1].state == RESERVED:
                # An open reservation is the release of this window in progress (or killed before
                # it finished): continue it, it is already counted, but only as its lease holder
                # and only with exactly the reserved mechanisms and parameters.
                current = candidates[-1]
                if current.owner != run_id and self._lease_live(current, now):
                    raise ReleaseInProgress(
                        f"release {current.id} ({release_key} of {window_start}..{window_end}) is being computed by "
                        f"run {current.owner} (lease until {current.lease_until:%Y-%m-%d %H:%M:%S} UTC); run {run_id} "
                        "does not compute it a second time. Wait for that run to finish and rerun this one (it then "
                        "reuses the release), or, if that run died, rerun after the lease expires (this run then "
                        "takes the reservation over), or set force_release to make (and pay for) a new release")
                self._check_description(current, description, digest, run_id)
                event = "renewed" if current.owner == run_id else "takeover"
                if event == "takeover":
                    log.warning("run %s takes over release %s from run %s (lease expired)", run_id, current.id,
                                current.owner)
                return Reservation(self._hold(conn, current, run_id, now, event), "resume")
            committed = mine if mine else ([] if force else [r for r in same if r.state == COMMITTED])
            if committed:
                return Reservation(committed[-1], "reuse")
            candidate = Release(
                id=-1, release_key=release_key, window_start=window_start, window_end=window_end,
                generation=(latest.generation + 1) if latest else 0, dag_id=dag_id, run_id=run_id,
                components=components, epsilon=epsilon, delta=delta, state=RESERVED, forced=force,
                reserved_at=now, finished_at=None, result=None,
            )
            active = [r for r in everything if r.state in (RESERVED, COMMITTED)]
            self._check_policy(active, candidate)
            result = conn.execute(insert(releases).values(
                release_key=release_key, window_start=window_start, window_end=window_end,
                generation=candidate.generation, dag_id=dag_id, run_id=run_id,
                mechanism=json.dumps([c.to_dict() for c in components]), epsilon=epsilon, delta=delta,
                state=RESERVED, forced=int(force), reserved_at=now, description=canonical_json(description),
                description_hash=digest, lease_owner=run_id,
                lease_until=now + dt.timedelta(seconds=self.lease_seconds),
            ))
            new_id = result.inserted_primary_key[0]
            self._append(conn, new_id, "reserved")
            return Reservation(self._get(conn, new_id), "new")

    def _check_policy(self, active: list[Release], candidate: Release) -> None:
        worst = self._worst_window(active, candidate)
        what = (f"release {candidate.release_key} [{candidate.window_start}..{candidate.window_end}] needs epsilon "
                f"{candidate.epsilon:.4g} (delta {candidate.delta:.3g})")
        if worst is not None and worst.epsilon > self.policy.epsilon:
            spent = self.window_spend(active, worst.start, worst.end)
            raise PrivacyBudgetExceeded(
                f"{what}; the users of {worst.start}..{worst.end} have spent epsilon "
                f"{spent.epsilon:.4g} in {len(spent.releases)} release(s), and with this release would "
                f"spend {worst.epsilon:.4g} (tight composition at delta {self.policy.delta:g}; basic "
                f"composition {worst.basic_epsilon:.4g}); the cap is epsilon {self.policy.epsilon:g}, "
                f"delta {self.policy.delta:g} per {self.policy.window_days} days"
            )
        if self.policy.lifetime_epsilon is not None:
            before = composed_epsilon([c for r in active for c in r.components], self.policy.delta)
            after = composed_epsilon([c for r in [*active, candidate] for c in r.components], self.policy.delta)
            if after > self.policy.lifetime_epsilon:
                raise PrivacyBudgetExceeded(
                    f"{what}; a user present in every release so far has spent epsilon {before:.4g} in "
                    f"{len(active)} release(s) and would spend {after:.4g} (tight composition at delta "
                    f"{self.policy.delta:g}); the lifetime cap is epsilon {self.policy.lifetime_epsilon:g}")

    def renew(self, release_id: int, *, run_id: str) -> Release:
        """Extend the lease of a reserved release this run holds (long computations call it)."""
        with self._locked() as conn:
            self._require_intact(conn)
            current = self._get(conn, release_id)
            self._require_lease(current, run_id, "renew")
            return self._hold(conn, current, run_id, self._now(), "renewed")

    def _require_lease(self, current: Release, run_id: str, action: str) -> None:
        if current.state != RESERVED:
            raise PrivrecError(f"release {current.id} is {current.state}, not reserved; cannot {action} it")
        if current.owner != run_id:
            raise LeaseLost(
                f"release {current.id} ({current.release_key} of {current.window_start}..{current.window_end}) is "
                f"held by run {current.owner}, not by run {run_id} (its lease expired and that run took it over): "
                f"run {run_id} cannot {action} it, and its own result is not published")

    def _finish(self, release_id: int, state: str, result: dict[str, Any], run_id: str,
                publish: Callable[[], None] | None = None) -> Release:
        with self._locked() as conn:
            self._require_intact(conn)
            current = self._get(conn, release_id)
            if current.state == state == COMMITTED:
                if current.owner != run_id:
                    raise LeaseLost(
                        f"release {current.id} was committed by run {current.owner}, not by run {run_id} (which lost "
                        f"its lease): run {run_id}'s own result is not published")
                return current  # committing twice (a retried commit) is harmless
            self._require_lease(current, run_id, "commit" if state == COMMITTED else "fail")
            if publish is not None:
                publish()  # under the ledger lock: no other run can take the lease over meanwhile
            conn.execute(update(releases).where(releases.c.id == release_id).values(
                state=state, finished_at=self._now(), result=json.dumps(result, sort_keys=True)))
            self._append(conn, release_id, state)
            return self._get(conn, release_id)

    def commit(self, release_id: int, result: dict[str, Any], *, run_id: str,
               publish: Callable[[], None] | None = None) -> Release:
        """The release is written: its cost stays spent for good. ``publish`` (e.g. the swap of
        the output into place) runs first, under the ledger lock and only while ``run_id``
        holds the lease; if it raises, nothing is committed."""
        return self._finish(release_id, COMMITTED, result, run_id, publish)

    def fail(self, release_id: int, reason: str, *, run_id: str) -> Release:
        """Nothing was released (the run failed before publishing): the reservation is returned.
        Only the lease holder may do this: another run's failure never fails this release."""
        return self._finish(release_id, FAILED, {"reason": reason}, run_id)

    # -- spend --------------------------------------------------------------------------
    def _worst_window(self, active: list[Release], candidate: Release) -> WindowSpend | None:
        """The policy window touching ``candidate`` with the largest composed epsilon."""
        worst = None
        seen: set[frozenset[int]] = set()
        w = self.policy.window_days
        start = candidate.window_start - dt.timedelta(days=w - 1)
        while start <= candidate.window_end:
            end = start + dt.timedelta(days=w - 1)
            inside = [r for r in active if r.overlaps(start, end)]
            key = frozenset(r.id for r in inside)
            if key not in seen:  # the same set of releases composes to the same epsilon
                seen.add(key)
                spend = self.window_spend([*inside, candidate], start, end)
                if worst is None or spend.epsilon > worst.epsilon:
                    worst = spend
            start += dt.timedelta(days=1)
        return worst

    def window_spend(self, active: list[Release], start: dt.date, end: dt.date) -> WindowSpend:
        inside = [r for r in active if r.overlaps(start, end) and r.state in (RESERVED, COMMITTED)]
        components = [c for r in inside for c in r.components]
        basic_e, basic_d = basic_composition([(r.epsilon, r.delta) for r in inside])
        return WindowSpend(start, end, inside, composed_epsilon(components, self.policy.delta),
                           basic_e, basic_d, self.policy)

    def spend_at(self, end: dt.date, window_days: int | None = None) -> WindowSpend:
        """What the users of [end - window + 1, end] have spent, release by release."""
        days = window_days or self.policy.window_days
        start = end - dt.timedelta(days=days - 1)
        return self.window_spend(self.releases(), start, end)


ENV_POLICY = {"epsilon": "PRIVREC_BUDGET_EPSILON", "delta": "PRIVREC_BUDGET_DELTA",
              "window_days": "PRIVREC_BUDGET_WINDOW_DAYS", "lifetime_epsilon": "PRIVREC_BUDGET_LIFETIME_EPSILON"}


def policy_from_env(environ: dict[str, str] | None = None) -> BudgetPolicy:
    """The budget policy of the deployment: ``PRIVREC_BUDGET_EPSILON``, ``PRIVREC_BUDGET_DELTA``,
    ``PRIVREC_BUDGET_WINDOW_DAYS`` and ``PRIVREC_BUDGET_LIFETIME_EPSILON`` override the defaults
    (epsilon 10, delta 1e-6, 30 days, no lifetime cap)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in ENV_POLICY.items():
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = int(raw) if name == "window_days" else float(raw)
        except ValueError:
            raise ConfigurationError(f"{var} must be a number, not {raw!r}") from None
    return BudgetPolicy(**values)


def open_ledger(lake: str | None = None) -> Ledger:
    """The deployment's ledger: ``$PRIVREC_LEDGER_URL`` (else the lake's SQLite file) and policy."""
    from privrec_pipeline.config import ledger_url

    return Ledger(ledger_url(lake), policy_from_env())
