"""The privacy ledger: composition equals dp_accounting, the cap holds over every rolling
window, retries and reruns spend nothing, forced reruns spend, and two processes cannot both
take the last of the budget. Every test runs against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import uuid

import pytest
from sqlalchemy import create_engine, text

from privrec_pipeline.errors import ConfigurationError, PrivacyBudgetExceeded
from privrec_pipeline.privacy.accounting import Component, composed_epsilon, release_guarantee
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger

PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
D = dt.date(2026, 1, 15)


def _pg_available() -> bool:
    try:
        with create_engine(PG_SERVER).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path, monkeypatch):
    """The URL a deployment would put in PRIVREC_LEDGER_URL (PostgreSQL: a fresh schema)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        if not _pg_available():
            pytest.skip("PostgreSQL at 127.0.0.1:5432 (database test) is not reachable")
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
        ledger.commit(reserve(ledger, D + dt.timedelta(days=i), 1.0).release.id, {"uri": f"day{i}"})
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
    retry = reserve(ledger, D, 1.0, run_id="run-1-retry")  # the task retried before committing
    assert retry.status == "resume" and retry.release.id == first.release.id
    ledger.commit(first.release.id, {"uri": "gold/dp_stats/dt=2026-01-15"})
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
    ledger.commit(reserve(ledger, D, 1.0).release.id, {})
    forced = reserve(ledger, D, 1.0, run_id="run-2", force=True)
    retry = reserve(ledger, D, 1.0, run_id="run-2", force=True)  # the task retried, Param still set
    assert forced.spends and retry.status == "resume" and retry.release.id == forced.release.id
    ledger.commit(forced.release.id, {})
    assert reserve(ledger, D, 1.0, run_id="run-2", force=True).status == "reuse"
    assert ledger.spend_at(D).epsilon == pytest.approx(2.0, abs=1e-3)


def test_failed_release_returns_its_reservation(ledger_url):
    ledger = Ledger(ledger_url, BudgetPolicy(epsilon=1.0, delta=1e-6, window_days=30))
    attempt = reserve(ledger, D, 1.0)
    ledger.fail(attempt.release.id, "spark job failed before writing")
    assert ledger.spend_at(D).epsilon == 0.0
    again = reserve(ledger, D, 1.0, run_id="run-2")
    assert again.spends and again.release.generation == 1
    with pytest.raises(Exception, match="is failed, not reserved"):
        ledger.commit(attempt.release.id, {})


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


def test_two_processes_cannot_both_take_the_last_of_the_budget(ledger_url):
    Ledger(ledger_url)  # create the tables first
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_take_last_of_budget, args=(ledger_url, f"run-{i}", start, results))
             for i in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120)[0] for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["exceeded", "ok"]
    assert len([r for r in Ledger(ledger_url).releases() if r.state == "reserved"]) == 1


def test_budget_command_shows_spent_and_remaining(ledger_url):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    ledger = Ledger(ledger_url)
    ledger.commit(reserve(ledger, D, 1.0).release.id, {"uri": "x"})
    ledger.fail(reserve(ledger, D + dt.timedelta(days=1), 2.0).release.id, "boom")
    out = CliRunner().invoke(app, ["budget", "--at", str(D + dt.timedelta(days=1)), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["spent"]["epsilon"] == pytest.approx(1.0, abs=1e-3) and doc["remaining_epsilon"] == pytest.approx(9.0, abs=1e-3)
    assert [r["state"] for r in doc["releases"]] == ["committed", "failed"]
    table = CliRunner().invoke(app, ["budget", "--at", str(D)])
    assert table.exit_code == 0 and "remaining: epsilon 9" in table.output and "dp_stats" in table.output
    ledger.commit(reserve(ledger, D, 0.5, run_id="run-forced", force=True).release.id, {"uri": "y"})
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
