"""The lake lock: an erasure never runs while a step is between reading users' rows and
writing them.

Steps that write rows of users (collect, pseudonymize, build_partitions, batch scoring,
retention) hold the lock **shared** from before they read their inputs (collect: before it
reads the erasure register) until their outputs and manifests are written; the erasure task
holds it **exclusively** while it removes users' rows and deletes their data keys. Two nightly
runs may overlap (``max_active_runs``): without the lock, a pseudonymize that read bronze
before an erasure removed a user from it could write silver with that user after the erasure
had searched silver, and the completed request would never look again. With it, each step
either finished before the erasure started (the erasure finds its output) or starts after it
ended (it reads erased inputs, and collect reads the request).

- PostgreSQL (a deployment's ledger database): session-level advisory locks
  (``pg_advisory_lock_shared`` / ``pg_advisory_lock``, keyed by the ledger's schema) on a
  connection of their own; the server releases them when that connection ends, so a task
  killed on any host never leaves the lake locked. A request waits behind a waiting request
  it conflicts with, so steps that keep starting do not starve a waiting erasure
  (PostgreSQL documentation, "Advisory Locks" and "Explicit Locking"). The connection sends
  TCP keepalives; a connection pooler in transaction mode (PgBouncer) would break session
  locks: point the ledger URL at PostgreSQL itself.
- SQLite (the embedded default, a local lake): ``flock(2)`` on ``lake.lock`` beside the
  ledger's database file, released by the kernel when the holding process ends. flock has no
  queue: a waiting erasure takes the lock in a moment when no step holds it (on one machine
  with at most two runs, between two steps).

The lock is not re-entrant: a thread that holds it and asks again is refused at once
(``ConfigurationError``) rather than left to deadlock behind a waiting erasure.

A step that has to wait says so in its log, naming who holds the lake.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import make_url

from privrec_pipeline.errors import ConfigurationError

log = logging.getLogger(__name__)
LAKE_LOCK_ID = 7_201_427  # first key of the advisory lock; the second is the ledger's schema
SHARED, EXCLUSIVE = "shared", "exclusive"
F = TypeVar("F", bound=Callable[..., Any])
_held = threading.local()  # what this thread holds the lock for
# What a waiter of each mode waits for.
HOLDERS = {SHARED: "an erasure is removing users", EXCLUSIVE: "steps are writing users' rows, or another erasure runs"}


@contextlib.contextmanager
def lake_lock(lake: str | None, mode: str, *, what: str, url: str | None = None) -> Iterator[None]:
    """Hold the lake lock in ``mode`` (``SHARED`` for a step, ``EXCLUSIVE`` for the erasure)
    for the block; ``what`` names the holder in the waiting message. The lock lives in the
    ledger's database: ``url``, else the lake's (``config.ledger_url``)."""
    from privrec_pipeline.config import ledger_url

    if mode not in HOLDERS:
        raise ValueError(f"lock mode must be {SHARED!r} or {EXCLUSIVE!r}, not {mode!r}")
    if getattr(_held, "what", None):
        raise ConfigurationError(f"{what} asked for the lake lock while {_held.what} holds it in this thread")
    url = url or ledger_url(lake)
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        lock = _advisory(url, mode, what)
    elif backend == "sqlite":
        lock = _flock(url, mode, what)
    else:
        raise ConfigurationError(f"the lake lock needs the ledger on PostgreSQL or SQLite, not {backend}")
    with lock:
        _held.what = what
        try:
            yield
        finally:
            _held.what = None


def _waiting(mode: str, what: str) -> None:
    log.warning("%s waits for the lake lock: %s", what, HOLDERS[mode])


@contextlib.contextmanager
def _advisory(url: str, mode: str, what: str) -> Iterator[None]:

    from sqlalchemy import create_engine

    suffix = "_shared" if mode == SHARED else ""
    args = f"{LAKE_LOCK_ID}, hashtext(current_schema())"
    # Keepalives: a connection dropped by a firewall would release the lock unnoticed.
    engine = create_engine(url, hide_parameters=True, connect_args={
        "keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 5})
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if not conn.execute(text(f"SELECT pg_try_advisory_lock{suffix}({args})")).scalar():
                _waiting(mode, what)
                conn.execute(text(f"SELECT pg_advisory_lock{suffix}({args})"))
            try:
                yield
            finally:
                try:  # never hides the step's own error, never fails a step that finished
                    if not conn.execute(text(f"SELECT pg_advisory_unlock{suffix}({args})")).scalar():
                        log.error("%s: the lake lock was no longer held at its end (the connection was reset?)",
                                  what)
                except Exception as exc:  # the connection is gone: so is the lock
                    log.error("%s: releasing the lake lock failed (%s); the server released it with the connection",
                              what, type(exc).__name__)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _flock(url: str, mode: str, what: str) -> Iterator[None]:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ConfigurationError("the lake lock needs the ledger in a database file, not in memory")
    path = Path(database).with_name("lake.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    operation = fcntl.LOCK_SH if mode == SHARED else fcntl.LOCK_EX
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            _waiting(mode, what)
            fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def step(name: str) -> Callable[[F], F]:
    """Decorator of a step that writes users' rows (a function with ``lake`` and usually
    ``day`` parameters): the whole call holds the lake lock shared."""
    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            day = bound.get("day")
            with lake_lock(bound["lake"], SHARED, what=f"{name} {day}" if day else name):
                return fn(*args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
