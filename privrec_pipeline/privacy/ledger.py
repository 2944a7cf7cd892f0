"""The privacy ledger: every DP release, reserved before it is computed, kept forever.

One row per release attempt: what is released (``release_key``) from which data window
(``window_start`` .. ``window_end``, UTC days, inclusive), by which DAG run, with which
mechanisms (``accounting.Component`` list as JSON), its own (epsilon, delta), and its state
(reserved -> committed | failed). A SQLAlchemy URL selects the database: the default is a
SQLite file in the lake, production uses any server (PostgreSQL is tested).

Budget policy (privacy contract points 3 and 4): for every window of ``window_days``
consecutive days, the tight composition (PLD) of all reserved or committed releases whose
data windows intersect it must stay within (epsilon, delta). A user's data of day d is used
by exactly the releases whose data windows contain d, so this caps every user's loss over
any rolling window. ``reserve`` checks every policy window the new release touches.

Concurrency: each reservation runs in one transaction whose first statement updates the
single row of ``privacy_ledger_lock``; on PostgreSQL that row lock, on SQLite the database
write lock, serializes reservations, so two runs cannot both take the last of the budget.

Idempotence: a run that reserves again (a retried task) gets its own release back, as
``"resume"`` while still reserved or ``"reuse"`` once committed, forced or not. Another run
of a key and window that already has an open reservation continues it (``"resume"``,
already counted) and one with a committed release gets the latest committed release
(``"reuse"``, nothing spent). ``force=True`` makes a new release of the same window, which
spends again (a deliberate re-release is a new release).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
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
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from privrec_pipeline.errors import ConfigurationError, PrivacyBudgetExceeded, PrivrecError
from privrec_pipeline.privacy.accounting import Component, basic_composition, composed_epsilon

RESERVED, COMMITTED, FAILED = "reserved", "committed", "failed"
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
    UniqueConstraint("release_key", "window_start", "window_end", "generation", name="uq_release_generation"),
)
lock = Table("privacy_ledger_lock", metadata, Column("id", Integer, primary_key=True), Column("version", Integer))


@dataclass(frozen=True)
class BudgetPolicy:
    epsilon: float = 10.0
    delta: float = 1e-6
    window_days: int = 30

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1 or self.window_days < 1:
            raise ConfigurationError(f"invalid budget policy {self}: need epsilon > 0, 0 < delta < 1, window >= 1 day")


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

    def overlaps(self, start: dt.date, end: dt.date) -> bool:
        return self.window_start <= end and start <= self.window_end


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


def _row(row: Any) -> Release:
    m = row._mapping
    return Release(
        id=m["id"], release_key=m["release_key"], window_start=m["window_start"], window_end=m["window_end"],
        generation=m["generation"], dag_id=m["dag_id"], run_id=m["run_id"],
        components=[Component.from_dict(c) for c in json.loads(m["mechanism"])],
        epsilon=m["epsilon"], delta=m["delta"], state=m["state"], forced=bool(m["forced"]),
        reserved_at=m["reserved_at"], finished_at=m["finished_at"],
        result=json.loads(m["result"]) if m["result"] else None,
    )


class Ledger:
    def __init__(self, url: str, policy: BudgetPolicy | None = None) -> None:
        self.url = url
        self.policy = policy or BudgetPolicy()
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}  # wait for the write lock, don't fail
        self.engine: Engine = create_engine(url, **kwargs)
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(select(lock.c.id)).first() is None:
                try:
                    conn.execute(insert(lock).values(id=1, version=0))
                except Exception:
                    pass

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        """A transaction that holds the ledger's write lock from its first statement."""
        with self.engine.begin() as conn:
            conn.execute(update(lock).where(lock.c.id == 1).values(version=lock.c.version + 1))
            yield conn

    def _all(self, conn: Connection) -> list[Release]:
        return [_row(r) for r in conn.execute(select(releases).order_by(releases.c.id))]

    def releases(self) -> list[Release]:
        with self.engine.connect() as conn:
            return self._all(conn)

    def reserve(self, release_key: str, window_start: dt.date, window_end: dt.date, components: list[Component],
                *, epsilon: float, delta: float, dag_id: str, run_id: str, force: bool = False) -> Reservation:
        """Reserve the cost of a release before computing it (see the module docstring)."""
        if window_end < window_start:
            raise ConfigurationError(f"data window ends ({window_end}) before it starts ({window_start})")
        if not components:
            raise ConfigurationError("a release needs at least one mechanism")
        with self._locked() as conn:
            everything = self._all(conn)
            same = [r for r in everything if r.release_key == release_key
                    and (r.window_start, r.window_end) == (window_start, window_end)]
            latest = same[-1] if same else None
            # A retried task (same run) continues its own attempt, forced or not.
            mine = [r for r in same if r.run_id == run_id and r.state in (RESERVED, COMMITTED)]
            if mine:
                return Reservation(mine[-1], "resume" if mine[-1].state == RESERVED else "reuse")
            if not force:
                # An open reservation is the release of this window in progress (or killed
                # before it finished): continue it, it is already counted. Otherwise the
                # latest committed release is the result (noise is drawn once per release).
                open_ = [r for r in same if r.state == RESERVED]
                if open_:
                    return Reservation(open_[-1], "resume")
                committed = [r for r in same if r.state == COMMITTED]
                if committed:
                    return Reservation(committed[-1], "reuse")
            now = dt.datetime.now(dt.UTC)  # audit time only; no data decision uses it
            candidate = Release(
                id=-1, release_key=release_key, window_start=window_start, window_end=window_end,
                generation=(latest.generation + 1) if latest else 0, dag_id=dag_id, run_id=run_id,
                components=components, epsilon=epsilon, delta=delta, state=RESERVED, forced=force,
                reserved_at=now, finished_at=None, result=None,
            )
            active = [r for r in everything if r.state in (RESERVED, COMMITTED)]
            worst = self._worst_window(active, candidate)
            if worst is not None and worst.epsilon > self.policy.epsilon:
                spent = self.window_spend(active, worst.start, worst.end)
                raise PrivacyBudgetExceeded(
                    f"release {release_key} [{window_start}..{window_end}] needs epsilon {epsilon:.4g} "
                    f"(delta {delta:.3g}); the users of {worst.start}..{worst.end} have spent epsilon "
                    f"{spent.epsilon:.4g} in {len(spent.releases)} release(s), and with this release would "
                    f"spend {worst.epsilon:.4g} (tight composition at delta {self.policy.delta:g}; basic "
                    f"composition {worst.basic_epsilon:.4g}); the cap is epsilon {self.policy.epsilon:g}, "
                    f"delta {self.policy.delta:g} per {self.policy.window_days} days"
                )
            result = conn.execute(insert(releases).values(
                release_key=release_key, window_start=window_start, window_end=window_end,
                generation=candidate.generation, dag_id=dag_id, run_id=run_id,
                mechanism=json.dumps([c.to_dict() for c in components]), epsilon=epsilon, delta=delta,
                state=RESERVED, forced=int(force), reserved_at=now,
            ))
            new_id = result.inserted_primary_key[0]
            row = conn.execute(select(releases).where(releases.c.id == new_id)).one()
            return Reservation(_row(row), "new")

    def _finish(self, release_id: int, state: str, result: dict[str, Any]) -> Release:
        with self._locked() as conn:
            row = conn.execute(select(releases).where(releases.c.id == release_id)).first()
            if row is None:
                raise PrivrecError(f"no release {release_id} in the ledger")
            current = _row(row)
            if current.state == state == COMMITTED:
                return current  # committing twice (a retried commit) is harmless
            if current.state != RESERVED:
                raise PrivrecError(f"release {release_id} is {current.state}, not reserved; cannot mark it {state}")
            conn.execute(update(releases).where(releases.c.id == release_id).values(
                state=state, finished_at=dt.datetime.now(dt.UTC), result=json.dumps(result, sort_keys=True)))
            return _row(conn.execute(select(releases).where(releases.c.id == release_id)).one())

    def commit(self, release_id: int, result: dict[str, Any]) -> Release:
        """The release is written: its cost stays spent for good."""
        return self._finish(release_id, COMMITTED, result)

    def fail(self, release_id: int, reason: str) -> Release:
        """Nothing was released (the run failed before publishing): the reservation is returned."""
        return self._finish(release_id, FAILED, {"reason": reason})

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
              "window_days": "PRIVREC_BUDGET_WINDOW_DAYS"}


def policy_from_env(environ: dict[str, str] | None = None) -> BudgetPolicy:
    """The budget policy of the deployment: ``PRIVREC_BUDGET_EPSILON``, ``PRIVREC_BUDGET_DELTA``
    and ``PRIVREC_BUDGET_WINDOW_DAYS`` override the defaults (epsilon 10, delta 1e-6, 30 days)."""
    import os

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
