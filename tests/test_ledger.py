"""The privacy ledger: composition equals dp_accounting, the cap holds over every rolling
window, retries and reruns spend nothing, forced reruns spend, and two processes cannot both
take the last of the budget. Every test runs against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import uuid

import pytest
from sqlalchemy import create_engine, text

from conftest import unavailable
from privrec_pipeline.errors import (
    ConfigurationError,
    LeaseLost,
    LedgerIntegrityError,
    PrivacyBudgetExceeded,
    ReleaseInProgress,
    ReleaseMismatch,
)
from privrec_pipeline.privacy.accounting import Component, composed_epsilon, release_guarantee
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger, policy_from_env

PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
D = dt.date(2026, 1, 15)


def _pg_available() -> bool:
    from sqlalchemy.exc import OperationalError

    try:  # only a connection failure means "no server"; any other error is a regression to see
        with create_engine(PG_SERVER).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except OperationalError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path, monkeypatch):
    """The URL a deployment would put in PRIVREC_LEDGER_URL (PostgreSQL: a fresh schema)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        if not _pg_available():
            unavailable("PostgreSQL at 127.0.0.1:5432 (database test) is not reachable")
        schema = f"ledger_{uuid.uuid4().hex[:10]}"
        engine = create_engine(PG_SERVER)
        with engine.begin() as conn:
            conn.execute(text(f"create schema {schema}"))
        url = f"{PG_SERVER}?options=-csearch_path%3D{schema}"
        request.addfinalizer(lambda: _drop(engine, schema))
    monkeypatch.setenv("PRIVREC_LEDGER_URL", url)
    return url


def _drop(engine, schema: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"drop schema {schema} cascade"))
    engine.dispose()


def laplace(eps: float, label: str = "counts") -> list[Component]:
    return [Component("laplace", noise_multiplier=1 / eps, label=label)]


def reserve(ledger: Ledger, day: dt.date, eps: float, *, key: str = "dp_stats", force: bool = False,
            run_id: str = "run-1", end: dt.date | None = None):
    return ledger.reserve(key, day, end or day, laplace(eps), epsilon=eps, delta=0.0,
                          dag_id="privrec_nightly", run_id=run_id, force=force)


def test_composition_matches_dp_accounting():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    components = [
        Component("laplace", noise_multiplier=2.0, count=3),
        Component("gaussian", noise_multiplier=1.1, sampling_rate=0.01, count=500),
        Component("gaussian", noise_multiplier=4.0),
    ]
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent([c.to_dp_event() for c in components]))
    for delta in (1e-5, 1e-6, 1e-8):
        assert composed_epsilon(components, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # pure Laplace releases state their pure epsilon (sum of 1 / noise multiplier)
    assert release_guarantee(laplace(0.5) + laplace(0.25), 1e-6) == (pytest.approx(0.75), 0.0)
    # tight composition of k pure-eps Laplace releases beats (or equals) basic composition
    assert composed_epsilon(laplace(1.0) * 20, 1e-6) < 20


def test_cap_is_enforced_with_a_message_naming_the_numbers(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=3.0, delta=1e-6, window_days=30))
    for i in range(2):
        ledger.commit(reserve(ledger, D + dt.timedelta(days=i), 1.0).release.id, {"uri": f"day{i}"}, run_id="run-1")
    with pytest.raises(PrivacyBudgetExceeded) as exc:
        reserve(ledger, D + dt.timedelta(days=2), 1.5)
    message = str(exc.value)
    for needed in ("needs epsilon 1.5", "have spent epsilon 2", "in 2 release(s)", "the cap is epsilon 3",
                   "per 30 days", "2025-12-19..2026-01-17"):
        assert needed in message, message
    # outside the window the budget is fresh again: 30 days later the old releases are out of it
    assert reserve(ledger, D + dt.timedelta(days=31), 2.5).spends


def test_every_rolling_window_is_checked(ledger_url):
    """A release in the middle composes with releases on both sides of it."""
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=2.5, delta=1e-6, window_days=10))
    reserve(ledger, D, 1.0)
    reserve(ledger, D + dt.timedelta(days=18), 1.0)
    # D+9 shares a 10-day window with D (days D..D+9) and another with D+18 (D+9..D+18), never both
    assert reserve(ledger, D + dt.timedelta(days=9), 1.4).spends
    with pytest.raises(PrivacyBudgetExceeded):  # a multi-day release spanning both
        reserve(ledger, D + dt.timedelta(days=5), 0.6, key="training", end=D + dt.timedelta(days=12))


def test_retry_and_rerun_spend_nothing_forced_rerun_spends(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=3.0, delta=1e-6, window_days=30))
    first = reserve(ledger, D, 1.0)
    assert first.status == "new"
    retry = reserve(ledger, D, 1.0)  # the task retried (same run id) before committing
    assert retry.status == "resume" and retry.release.id == first.release.id
    ledger.commit(first.release.id, {"uri": "gold/dp_stats/dt=2026-01-15"}, run_id="run-1")
    rerun = reserve(ledger, D, 1.0, run_id="run-2")
    assert rerun.status == "reuse" and not rerun.spends and rerun.release.result == {"uri": "gold/dp_stats/dt=2026-01-15"}
    assert ledger.spend_at(D).epsilon == pytest.approx(1.0, abs=1e-3)
    forced = reserve(ledger, D, 1.0, run_id="run-3", force=True)
    assert forced.spends and forced.release.generation == 1 and forced.release.forced
    assert ledger.spend_at(D).epsilon == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(PrivacyBudgetExceeded):
        reserve(ledger, D, 1.5, run_id="run-4", force=True)


def test_a_retried_forced_run_continues_its_own_release(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=3.0, delta=1e-6, window_days=30))
    ledger.commit(reserve(ledger, D, 1.0).release.id, {}, run_id="run-1")
    forced = reserve(ledger, D, 1.0, run_id="run-2", force=True)
    retry = reserve(ledger, D, 1.0, run_id="run-2", force=True)  # the task retried, Param still set
    assert forced.spends and retry.status == "resume" and retry.release.id == forced.release.id
    ledger.commit(forced.release.id, {}, run_id="run-2")
    assert reserve(ledger, D, 1.0, run_id="run-2", force=True).status == "reuse"
    assert ledger.spend_at(D).epsilon == pytest.approx(2.0, abs=1e-3)


def test_failed_release_returns_its_reservation(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=1.0, delta=1e-6, window_days=30))
    attempt = reserve(ledger, D, 1.0)
    ledger.fail(attempt.release.id, "spark job failed before writing", run_id="run-1")
    assert ledger.spend_at(D).epsilon == 0.0
    again = reserve(ledger, D, 1.0, run_id="run-2")
    assert again.spends and again.release.generation == 1
    with pytest.raises(Exception, match="is failed, not reserved"):
        ledger.commit(attempt.release.id, {}, run_id="run-1")


def _take_last_of_budget(url: str, run_id: str, start, results) -> None:
    ledger = Ledger(url, BudgetPolicy(epsilon=1.5, delta=1e-6, window_days=30))
    start.wait()
    try:
        # different releases of the same day: only the budget, not a unique key, can stop one
        reservation = ledger.reserve(f"dp_stats/{run_id}", D, D, laplace(1.0), epsilon=1.0, delta=0.0,
                                     dag_id="privrec_nightly", run_id=run_id)
        results.put(("ok", reservation.release.id))
    except PrivacyBudgetExceeded as exc:
        results.put(("exceeded", str(exc)))


def _race(target, url: str, processes: int) -> list:
    """Run ``target(url, run id, barrier, queue)`` in ``processes`` spawned processes released
    together by a barrier; what they put on the queue, once all have ended."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, f"run-{i}", start, results)) for i in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    out = []
    while not results.empty():
        out.append(results.get(timeout=5))
    return out


def test_two_processes_cannot_both_take_the_last_of_the_budget(ledger_url):
    Ledger(ledger_url)  # create the tables first
    outcomes = sorted(r[0] for r in _race(_take_last_of_budget, ledger_url, 2))
    assert outcomes == ["exceeded", "ok"]
    assert len([r for r in Ledger(ledger_url).releases() if r.state == "reserved"]) == 1


def test_budget_command_shows_spent_and_remaining(ledger_url):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    ledger = Ledger(ledger_url)
    ledger.commit(reserve(ledger, D, 1.0).release.id, {"uri": "x"}, run_id="run-1")
    ledger.fail(reserve(ledger, D + dt.timedelta(days=1), 2.0).release.id, "boom", run_id="run-1")
    out = CliRunner().invoke(app, ["budget", "--at", str(D + dt.timedelta(days=1)), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["spent"]["epsilon"] == pytest.approx(1.0, abs=1e-3) and doc["remaining_epsilon"] == pytest.approx(9.0, abs=1e-3)
    assert [r["state"] for r in doc["releases"]] == ["committed", "failed"]
    table = CliRunner().invoke(app, ["budget", "--at", str(D)])
    assert table.exit_code == 0 and "remaining: epsilon 9" in table.output and "dp_stats" in table.output
    ledger.commit(reserve(ledger, D, 0.5, run_id="run-forced", force=True).release.id, {"uri": "y"},
                  run_id="run-forced")
    forced = CliRunner().invoke(app, ["budget", "--at", str(D)])
    assert "(forced)" in forced.output  # shown, not swallowed as rich markup


def test_bad_reservations_are_clear_errors(ledger_url):
    ledger = Ledger(ledger_url)
    with pytest.raises(ConfigurationError, match=r"ends .* before it starts"):
        ledger.reserve("dp_stats", D, D - dt.timedelta(days=1), laplace(1.0), epsilon=1.0, delta=0.0,
                       dag_id="d", run_id="r")
    with pytest.raises(ConfigurationError, match="noise_multiplier must be > 0"):
        Component("laplace", noise_multiplier=0)
    with pytest.raises(ConfigurationError, match="invalid budget policy"):
        BudgetPolicy(epsilon=0)


# -- resumes prove what they spend; leases; integrity (issue: guarantees under faults) --------


def test_a_resume_with_other_parameters_fails_naming_both(ledger_url):
    """A run reserves epsilon 0.5 and dies; a second run with epsilon 50 must not continue it."""
    ledger = Ledger(ledger_url, lease_seconds=0)  # the first run's lease has expired
    first = ledger.reserve("dp_stats", D, D, laplace(0.5), epsilon=0.5, delta=0.0, dag_id="d", run_id="run-1",
                           parameters={"settings": {"max_items_per_user": 5}})
    with pytest.raises(ReleaseMismatch) as exc:
        ledger.reserve("dp_stats", D, D, laplace(50.0), epsilon=50.0, delta=0.0, dag_id="d", run_id="run-2",
                       parameters={"settings": {"max_items_per_user": 5}})
    message = str(exc.value)
    for needed in (f"release {first.release.id}", "run-1", "run-2", "epsilon: reserved 0.5, now 50.0",
                   "force_release", first.release.description_hash):
        assert needed in message, message
    with pytest.raises(ReleaseMismatch, match=r"parameters\.settings\.max_items_per_user: reserved 5, now 10"):
        ledger.reserve("dp_stats", D, D, laplace(0.5), epsilon=0.5, delta=0.0, dag_id="d", run_id="run-2",
                       parameters={"settings": {"max_items_per_user": 10}})
    # the same run retrying with other settings is refused too
    with pytest.raises(ReleaseMismatch):
        ledger.reserve("dp_stats", D, D, laplace(0.5), epsilon=0.5, delta=0.0, dag_id="d", run_id="run-1",
                       parameters={"settings": {"max_items_per_user": 6}})
    same = ledger.reserve("dp_stats", D, D, laplace(0.5), epsilon=0.5, delta=0.0, dag_id="d", run_id="run-2",
                          parameters={"settings": {"max_items_per_user": 5}})
    assert same.status == "resume" and same.release.id == first.release.id and same.release.lease_owner == "run-2"
    assert [r.epsilon for r in ledger.releases()] == [0.5]


def test_one_run_holds_a_release_and_another_cannot_publish_or_fail_it(ledger_url):
    ledger = Ledger(ledger_url)  # a live lease of two hours
    a = reserve(ledger, D, 1.0, run_id="run-a")
    with pytest.raises(ReleaseInProgress, match="being computed by run run-a"):
        reserve(ledger, D, 1.0, run_id="run-b")
    with pytest.raises(LeaseLost):
        ledger.fail(a.release.id, "run-b failed", run_id="run-b")  # b's failure never fails a's release
    with pytest.raises(LeaseLost):
        ledger.commit(a.release.id, {}, run_id="run-b")
    assert ledger.releases()[0].state == "reserved"
    published = []
    ledger.commit(a.release.id, {"uri": "x"}, run_id="run-a", publish=lambda: published.append("a"))
    assert published == ["a"] and ledger.releases()[0].state == "committed"
    assert reserve(ledger, D, 1.0, run_id="run-b").status == "reuse"


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced_off(ledger_url):
    ledger = Ledger(ledger_url, lease_seconds=0)
    a = reserve(ledger, D, 1.0, run_id="run-a")
    b = reserve(ledger, D, 1.0, run_id="run-b")  # run-a looks dead: its lease expired
    assert b.status == "resume" and b.release.id == a.release.id and b.release.owner == "run-b"
    published = []
    with pytest.raises(LeaseLost, match="held by run run-b"):
        ledger.commit(a.release.id, {}, run_id="run-a", publish=lambda: published.append("a"))
    assert published == []  # the old owner's output never goes in place
    ledger.commit(a.release.id, {}, run_id="run-b", publish=lambda: published.append("b"))
    assert published == ["b"] and ledger.spend_at(D).epsilon == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(LeaseLost, match="committed by run run-b"):  # not told its late commit succeeded
        ledger.commit(a.release.id, {}, run_id="run-a", publish=lambda: published.append("a"))
    assert published == ["b"]


def test_a_failed_publish_commits_nothing(ledger_url):
    ledger = Ledger(ledger_url)
    a = reserve(ledger, D, 1.0)

    def swap():
        raise OSError("rename failed")

    with pytest.raises(OSError):
        ledger.commit(a.release.id, {}, run_id="run-1", publish=swap)
    assert ledger.releases()[0].state == "reserved" and ledger.verify()[0] == []


def _reserve_and_publish(url: str, run_id: str, start, results) -> None:
    ledger = Ledger(url)
    start.wait()
    try:
        r = ledger.reserve("dp_stats", D, D, laplace(1.0), epsilon=1.0, delta=0.0, dag_id="d", run_id=run_id)
        if r.status != "reuse":  # as dp_stats does: a committed release is read, not published again
            ledger.commit(r.release.id, {"by": run_id}, run_id=run_id,
                          publish=lambda: results.put(("published", run_id)))
        results.put(("done", r.status))
    except ReleaseInProgress:
        results.put(("done", "in progress"))


def test_two_processes_of_one_day_publish_one_release(ledger_url):
    """Two runs of the same day at once (a manual trigger beside a backfill): one publishes, the
    other is told the release is in progress or reuses it; never two publications."""
    Ledger(ledger_url)
    events = _race(_reserve_and_publish, ledger_url, 2)
    assert len([e for e in events if e[0] == "published"]) == 1, events
    assert sorted(e[1] for e in events if e[0] == "done") in (["in progress", "new"], ["new", "reuse"]), events
    [release] = Ledger(ledger_url).releases()
    assert release.state == "committed" and release.result == {"by": next(e for e in events if e[0] == "published")[1]}


def _reserve_then_die(url: str) -> None:
    ledger = Ledger(url, lease_seconds=0)
    ledger.reserve("dp_stats", D, D, laplace(1.0), epsilon=1.0, delta=0.0, dag_id="d", run_id="run-killed")
    os._exit(9)  # killed between the reservation and the commit


def test_a_run_killed_after_reserving_is_taken_over_without_spending_again(ledger_url):
    ctx = multiprocessing.get_context("spawn")
    Ledger(ledger_url)
    proc = ctx.Process(target=_reserve_then_die, args=(ledger_url,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 9
    ledger = Ledger(ledger_url)
    r = ledger.reserve("dp_stats", D, D, laplace(1.0), epsilon=1.0, delta=0.0, dag_id="d", run_id="run-next")
    assert r.status == "resume" and not r.spends
    ledger.commit(r.release.id, {}, run_id="run-next")
    assert ledger.spend_at(D).epsilon == pytest.approx(1.0, abs=1e-3) and ledger.verify()[0] == []


def _sql(url: str, *statements: str) -> None:
    with create_engine(url).begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _drop_triggers(url: str) -> None:
    if url.startswith("sqlite"):
        _sql(url, *[f"drop trigger {t}" for t in (
            "privacy_releases_no_delete", "privacy_ledger_entries_no_delete", "privacy_ledger_entries_no_update")])
    else:
        _sql(url, "drop trigger privacy_releases_no_delete on privacy_releases",
             "drop trigger privacy_ledger_entries_no_delete on privacy_ledger_entries",
             "drop trigger privacy_ledger_entries_no_update on privacy_ledger_entries")


def _two_committed_days(url: str) -> Ledger:
    ledger = Ledger(url, BudgetPolicy(epsilon=2.5, delta=1e-6, window_days=30))
    for i in range(2):
        ledger.commit(reserve(ledger, D + dt.timedelta(days=i), 1.0).release.id, {}, run_id="run-1")
    assert ledger.verify()[0] == []
    return ledger


def test_the_ledger_is_append_only(ledger_url):
    _two_committed_days(ledger_url)
    statements = ["delete from privacy_releases where id = 1", "delete from privacy_ledger_entries",
                  "update privacy_ledger_entries set body = '{}' where seq = 1"]
    if ledger_url.startswith("postgresql"):
        statements += ["truncate privacy_ledger_entries", "truncate privacy_releases"]
    for statement in statements:
        with pytest.raises(Exception, match="append-only"):
            _sql(ledger_url, statement)
    # a ledger whose chain was emptied is not re-imported from its (possibly edited) rows
    _drop_triggers(ledger_url)
    _sql(ledger_url, "delete from privacy_ledger_entries", "update privacy_ledger_lock set head_seq = 0, head_hash = "
         f"'{'0' * 64}'", "update privacy_releases set epsilon = 0.001")
    assert Ledger(ledger_url).verify()[0]


def test_descriptions_ignore_the_last_bits_of_derived_numbers():
    from privrec_pipeline.privacy.ledger import canonical_json, describe

    sigma = 1.2345678901234567

    def doc(s):
        return canonical_json(describe("training", D, D, [Component("gaussian", noise_multiplier=s)], 1.0, 1e-7,
                                       {"plan": {"noise_multiplier": s}}))

    assert doc(sigma) == doc(sigma * (1 + 1e-15)) != doc(sigma * (1 + 1e-9))


@pytest.mark.parametrize("tamper", ["delete_release", "edit_epsilon", "edit_entry", "cut_tail", "insert_release"])
def test_verify_detects_every_edit_and_reserve_fails_closed(ledger_url, tamper):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    ledger = _two_committed_days(ledger_url)
    with pytest.raises(PrivacyBudgetExceeded):  # 2 of 2.5 spent
        reserve(ledger, D + dt.timedelta(days=2), 1.0)
    _drop_triggers(ledger_url)
    _sql(ledger_url, *{
        "delete_release": ["delete from privacy_releases where id = 1"],  # would reset the budget
        "edit_epsilon": ["update privacy_releases set epsilon = 0.001, mechanism = "
                         "'[{\"count\": 1, \"label\": \"counts\", \"mechanism\": \"laplace\", "
                         "\"noise_multiplier\": 1000.0, \"sampling_rate\": 1.0}]' where id = 1"],
        "edit_entry": ["update privacy_ledger_entries set body = replace(body, '\"epsilon\":1.0', "
                       "'\"epsilon\":0.001') where seq = 1"],
        "cut_tail": ["delete from privacy_ledger_entries where seq = (select max(seq) from privacy_ledger_entries)"],
        "insert_release": ["insert into privacy_releases (release_key, window_start, window_end, generation, dag_id, "
                           "run_id, mechanism, epsilon, delta, state, forced, reserved_at) values ('x', '2026-03-01', "
                           "'2026-03-01', 0, 'd', 'r', '[]', 0, 0, 'failed', 0, '2026-03-01 00:00:00')"],
    }[tamper])
    problems, _, _ = Ledger(ledger_url).verify()
    assert problems, tamper
    with pytest.raises(LedgerIntegrityError, match="does not verify"):
        reserve(Ledger(ledger_url), D + dt.timedelta(days=2), 1.0)
    out = CliRunner().invoke(app, ["budget", "--verify"])
    assert out.exit_code == 1 and "does not verify" in out.output, out.output


def test_budget_verify_prints_the_head_of_an_intact_ledger(ledger_url):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    ledger = _two_committed_days(ledger_url)
    _problems, count, head = ledger.verify()
    out = CliRunner().invoke(app, ["budget", "--verify"])
    assert out.exit_code == 0, out.output
    assert "verified" in out.output and f"{count} entries" in out.output and head in out.output


def test_lifetime_cap_counts_every_release_ever_made(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=2.0, delta=1e-6, window_days=7, lifetime_epsilon=3.0))
    for i in range(3):  # far apart: no rolling window holds two of them
        ledger.commit(reserve(ledger, D + dt.timedelta(days=10 * i), 1.0).release.id, {}, run_id="run-1")
    with pytest.raises(PrivacyBudgetExceeded, match="lifetime cap is epsilon 3"):
        reserve(ledger, D + dt.timedelta(days=40), 1.0)
    assert policy_from_env({"PRIVREC_BUDGET_LIFETIME_EPSILON": "50"}).lifetime_epsilon == 50.0
    with pytest.raises(ConfigurationError, match="lifetime_epsilon"):
        BudgetPolicy(epsilon=10, lifetime_epsilon=5)


def _old_ledger(url: str) -> None:
    """A ledger as written before descriptions, leases and the chain existed, one open release."""
    key = "integer primary key autoincrement" if url.startswith("sqlite") else "serial primary key"
    when = "datetime" if url.startswith("sqlite") else "timestamp with time zone"
    _sql(url, f"create table privacy_releases (id {key}, release_key varchar(200) not "
              "null, window_start date not null, window_end date not null, generation integer not null, dag_id "
              "varchar(250) not null, run_id varchar(250) not null, mechanism text not null, epsilon float not null, "
              f"delta float not null, state varchar(16) not null, forced integer not null, reserved_at {when} not "
              f"null, finished_at {when}, result text)",
         "create table privacy_ledger_lock (id integer primary key, version integer)",
         "insert into privacy_ledger_lock values (1, 0)",
         "insert into privacy_releases (release_key, window_start, window_end, generation, dag_id, run_id, mechanism, "
         "epsilon, delta, state, forced, reserved_at) values ('dp_stats', '2026-01-15', '2026-01-15', 0, 'd', 'old', "
         "'[{\"mechanism\": \"laplace\", \"noise_multiplier\": 2.0}]', 0.5, 0, 'reserved', 0, "
         "'2026-01-16 01:30:00')")


def _open_ledger(url: str, run_id: str, start, results) -> None:
    start.wait()
    try:
        Ledger(url)
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")


def test_workers_starting_together_migrate_an_old_ledger_once(ledger_url):
    _old_ledger(ledger_url)
    assert _race(_open_ledger, ledger_url, 4) == ["ok"] * 4
    problems, count, _ = Ledger(ledger_url).verify()
    assert problems == [] and count == 1  # the old release imported once


def test_a_ledger_written_before_the_chain_is_imported_and_its_open_reservation_not_resumed(tmp_path):
    """Old ledgers (no description, lease or chain columns) are migrated in place."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _sql(url, "create table privacy_releases (id integer primary key autoincrement, release_key varchar(200) not "
              "null, window_start date not null, window_end date not null, generation integer not null, dag_id "
              "varchar(250) not null, run_id varchar(250) not null, mechanism text not null, epsilon float not null, "
              "delta float not null, state varchar(16) not null, forced integer not null, reserved_at datetime not "
              "null, finished_at datetime, result text)",
         "create table privacy_ledger_lock (id integer primary key, version integer)",
         "insert into privacy_ledger_lock values (1, 0)",
         "insert into privacy_releases (release_key, window_start, window_end, generation, dag_id, run_id, mechanism, "
         "epsilon, delta, state, forced, reserved_at) values ('dp_stats', '2026-01-15', '2026-01-15', 0, 'd', 'old', "
         "'[{\"mechanism\": \"laplace\", \"noise_multiplier\": 2.0}]', 0.5, 0, 'reserved', 0, "
         "'2026-01-16 01:30:00.000000')")
    ledger = Ledger(url)
    assert ledger.verify()[0] == [] and ledger.verify()[1] == 1
    assert ledger.spend_at(D).epsilon == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ReleaseMismatch, match="before privrec recorded release descriptions"):
        ledger.reserve("dp_stats", D, D, laplace(0.5), epsilon=0.5, delta=0.0, dag_id="d", run_id="new")
