"""The lake lock: steps share it, the erasure holds it alone, a waiter says so in its log,
a killed holder never leaves the lake locked (SQLite's flock and PostgreSQL's advisory locks);
and the steps that write users' rows really wait for a running erasure, and the erasure for
them."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable

import pytest
import test_ledger

from conftest import DAY, good_event, line, write_landing
from privrec_pipeline import lake as lk
from privrec_pipeline.erasure.lake_lock import EXCLUSIVE, SHARED, lake_lock

ledger_url = test_ledger.ledger_url  # the fixture: a fresh SQLite file or PostgreSQL schema
WAIT = 120  # seconds a test waits for an event before it fails (never slept)


class Waits(logging.Handler):
    """Sets an event when someone logs that they wait for the lake lock."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "waits for the lake lock" in record.getMessage():
            self.messages.append(record.getMessage())
            self.event.set()


@pytest.fixture()
def waits():
    handler = Waits()
    logger = logging.getLogger("privrec_pipeline.erasure.lake_lock")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class Holder:
    """Holds the lake lock in a thread until released."""

    def __init__(self, lake: str | None, mode: str, url: str | None = None) -> None:
        self.held, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(lake, mode, url), daemon=True)
        self.thread.start()

    def _run(self, lake, mode, url) -> None:
        with lake_lock(lake, mode, what=f"a {mode} holder", url=url):
            self.held.set()
            self.release.wait(WAIT)
        self.done.set()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("first, second", [(SHARED, EXCLUSIVE), (EXCLUSIVE, SHARED), (EXCLUSIVE, EXCLUSIVE)])
def test_a_conflicting_request_waits_and_says_so(ledger_url, waits, first, second):
    holder = Holder(None, first, ledger_url)
    assert holder.held.wait(WAIT)
    waiter = Holder(None, second, ledger_url)
    assert waits.event.wait(WAIT) and not waiter.held.is_set()
    assert waits.messages == [f"a {second} holder waits for the lake lock: " + (
        "an erasure is removing users" if second == SHARED else "steps are writing users' rows, or another erasure runs")]
    holder.release.set()
    assert waiter.held.wait(WAIT)
    waiter.release.set()
    assert waiter.done.wait(WAIT)


def test_steps_share_the_lock(ledger_url, waits):
    holders = [Holder(None, SHARED, ledger_url) for _ in range(3)]
    assert all(h.held.wait(WAIT) for h in holders) and not waits.messages
    for h in holders:
        h.release.set()
        assert h.done.wait(WAIT)


def test_a_killed_holder_leaves_the_lake_unlocked(ledger_url, waits):
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    child = ctx.Process(target=_hold_forever, args=(ledger_url, held), daemon=True)
    child.start()
    assert held.wait(WAIT)
    probe = Holder(None, SHARED, ledger_url)
    assert waits.event.wait(WAIT)  # the child holds it
    child.kill()
    child.join(WAIT)
    assert probe.held.wait(WAIT)  # released by the kernel / the database server, not by the child
    probe.release.set()


def _hold_forever(url, held) -> None:
    with lake_lock(None, EXCLUSIVE, what="a task that is killed", url=url):
        held.set()
        threading.Event().wait()


def test_bad_modes_and_databases_are_refused(tmp_path):
    from privrec_pipeline.errors import ConfigurationError

    with pytest.raises(ValueError, match="lock mode"), lake_lock(None, "both", what="x", url="sqlite:///x.db"):
        pass
    with pytest.raises(ConfigurationError, match="in a database file"), \
            lake_lock(None, SHARED, what="x", url="sqlite://"):
        pass
    with pytest.raises(ConfigurationError, match="PostgreSQL or SQLite, not mysql"), \
            lake_lock(None, SHARED, what="x", url="mysql://u@h/db"):
        pass


@pytest.mark.spark
def test_pseudonymize_waits_for_a_running_erasure_and_the_erasure_for_collect(spark, lake, keyring, waits):
    """The steps' real entry points: pseudonymize does not read bronze while the erasure holds
    the lake; the erasure does not start while collect holds it."""
    from privrec_pipeline.erasure.apply import process_pending
    from privrec_pipeline.erasure.requests import open_register
    from privrec_pipeline.ingest import run_collect, run_pseudonymize

    write_landing(lake, DAY, [line(good_event(i)) for i in range(21)])
    run_collect(spark, lake, DAY, keyring)
    erasure = Holder(lake, EXCLUSIVE)
    assert erasure.held.wait(WAIT)
    thread, out = in_thread(lambda: run_pseudonymize(spark, lake, DAY, keyring))
    assert waits.event.wait(WAIT)
    assert waits.messages == [f"pseudonymize {DAY} waits for the lake lock: an erasure is removing users"]
    assert not lk.path(lk.manifest_uri(lake, "pseudonymize", DAY)).exists()
    erasure.release.set()
    thread.join(WAIT)
    assert "error" not in out and out["result"].silver_records == 21

    waits.event.clear()
    waits.messages.clear()
    open_register(lake).record(keyring, ["usr_0001"])
    step = Holder(lake, SHARED)  # collect, as far as the lock goes
    assert step.held.wait(WAIT)
    thread, out = in_thread(lambda: process_pending(lake, keyring))
    assert waits.event.wait(WAIT)
    assert waits.messages == ["the erasure task waits for the lake lock: steps are writing users' rows, or another "
                              "erasure runs"]
    assert [r.state for r in open_register(lake).requests()] == ["pending"]
    step.release.set()
    thread.join(WAIT)
    assert "error" not in out and len(out["result"]) == 1


def test_the_erasure_task_takes_no_lock_without_pending_requests(lake, keyring, waits):
    from privrec_pipeline.erasure.apply import process_pending

    step = Holder(lake, SHARED)
    assert step.held.wait(WAIT)
    assert process_pending(lake, keyring) == [] and not waits.messages  # did not wait for the step
    step.release.set()


def test_asking_again_in_the_same_thread_is_refused_not_a_deadlock(ledger_url):
    from privrec_pipeline.errors import ConfigurationError

    with lake_lock(None, SHARED, what="collect 2026-01-15", url=ledger_url):
        with pytest.raises(ConfigurationError, match="while collect 2026-01-15 holds it in this thread"), \
                lake_lock(None, EXCLUSIVE, what="the erasure task", url=ledger_url):
            pass
    with lake_lock(None, EXCLUSIVE, what="the erasure task", url=ledger_url):  # released: free again
        pass
