"""Backfills on a running Airflow, as an operator does them.

``privrec airflow`` (``airflow standalone``: API server, scheduler, DAG processor, LocalExecutor)
runs on PostgreSQL, which also holds the privacy ledger, as in production. A backfill of two
days through the REST API runs each day once, in order; the ledger accounts each day's DP
release and the training window once; a second backfill of a finished day changes no output
and spends nothing; the model published on the window's last day triggers the Asset-scheduled
DAG. The UI's Backfill dialog is checked in headless Chromium.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from conftest import free_ports, partition_snapshot, unavailable
from privrec_pipeline import lake as lk
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

pytestmark = pytest.mark.airflow


PRIVREC = str(Path(sys.executable).parent / "privrec")
PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
DAG = "privrec_nightly"
BATCH_DAG = "privrec_batch_recommendations"
# Days before 2026: the DAG's start date once was 2026-01-01, and Airflow then marked runs of
# older days successful without running a task (history of any age must run).
DAYS = [dt.date(2025, 12, 29), dt.date(2025, 12, 30)]  # the 30th closes a 2-day window
CONF = {
    "dp_epsilon": 50, "train_window_days": 2, "train_epsilon": 8,
    "train_settings": {"local_steps": 3, "batch_size": 20, "dim": 16},
    # A 200-user day cannot beat DP popularity reliably; the gate's mechanics are tested in
    # test_models.py. Here the window's model must publish, to trigger the Asset-scheduled DAG.
    "publish_settings": {"min_gain_over_dp_popularity": -1},
}
DONE = ("success", "failed")
TIMEOUT_S = 1200


@dataclass
class Server:
    base: str
    password: str
    env: dict[str, str]
    root: Path
    headers: dict[str, str]

    @property
    def lake(self) -> str:
        return self.env["PRIVREC_LAKE"]

    def api(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs) -> dict:
        response = requests.request(method, self.base + "/api/v2" + path, headers={**self.headers, **(headers or {})},
                                    timeout=60, **kwargs)
        assert response.ok, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def runs(self, dag_id: str = DAG) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "logical_date"})["dag_runs"]

    def backfill(self, first: dt.date, last: dt.date, reprocess: str, dry_run: bool = False) -> dict:
        return self.api("POST", "/backfills/dry_run" if dry_run else "/backfills", json={
            "dag_id": DAG, "from_date": f"{first}T00:00:00Z", "to_date": f"{last}T23:59:00Z",
            "reprocess_behavior": reprocess, "max_active_runs": 1, "dag_run_conf": CONF})

    def wait_for_backfill(self, backfill: dict) -> list[dict]:
        """The backfill's days' runs once the scheduler marked the backfill complete."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.api("GET", f"/backfills/{backfill['id']}")["completed_at"] is None:
            assert time.monotonic() < deadline, f"backfill {backfill['id']} not done in {TIMEOUT_S} s: {self.runs()}"
            time.sleep(2)
        first, last = (dt.date.fromisoformat(backfill[k][:10]) for k in ("from_date", "to_date"))
        return [r for r in self.runs() if r["run_type"] == "backfill" and first <= _day_of(r) <= last]


def _postgres_database(name: str, drop_only: bool = False) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if not drop_only:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop Airflow and every process it started (they share its process group)."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.5)


# Every port ``airflow standalone`` binds with the LocalExecutor: the API server (which also
# serves the Execution API), the scheduler's worker log server and the triggerer's log server
# (the scheduler's health check server is off by default). Left at their defaults (8080, 8793,
# 8794), two runs of this module, or a leftover Airflow, would collide.
AIRFLOW_PORTS = ("AIRFLOW__API__PORT", "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
                 "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT")
BIND_ERROR = re.compile(r"address already in use", re.IGNORECASE)  # uvicorn's and the OS's wording
START_ATTEMPTS = 2
START_TIMEOUT_S = 240


class PortTaken(Exception):
    """A port chosen free was taken before Airflow bound it: start again on other ports."""


def port_env(ports: list[int]) -> dict[str, str]:
    env = {name: str(port) for name, port in zip(AIRFLOW_PORTS, ports, strict=True)}
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://127.0.0.1:{ports[0]}/execution/"
    return env


def _log_server_up(log_text: str, port: int) -> bool:
    """uvicorn's "running on" line for the port (the log servers print nothing else when up)."""
    return re.search(rf"running on \S+:{port}\b", log_text, re.IGNORECASE) is not None


def _wait_until_ready(proc: subprocess.Popen, log: Path, env: dict[str, str], root: Path, password: str,
                      ports: list[int]) -> Server:
    """The API answers with a token, both DAGs are parsed, and both log servers run on their
    ports; a bind error on any port raises ``PortTaken``."""
    base = f"http://127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + START_TIMEOUT_S

    def check(waiting_for: str) -> str:
        text = log.read_text(errors="replace")
        if BIND_ERROR.search(text):
            raise PortTaken(f"a port of {dict(zip(AIRFLOW_PORTS, ports, strict=True))} was taken:\n{text[-3000:]}")
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"Airflow did not start ({waiting_for}; exit {proc.returncode}):\n{text[-3000:]}")
        return text

    token = None
    while token is None:
        check("API server")
        try:
            if requests.get(base + "/api/v2/monitor/health", timeout=5).ok:
                reply = requests.post(base + "/auth/token", json={"username": "admin", "password": password},
                                      timeout=30)
                token = reply.json()["access_token"] if reply.ok else None
        except requests.ConnectionError:
            pass
        time.sleep(1)
    srv = Server(base, password, env, root, {"Authorization": f"Bearer {token}"})
    while requests.get(f"{base}/api/v2/dags/{BATCH_DAG}", headers=srv.headers, timeout=30).status_code != 200 \
            or requests.get(f"{base}/api/v2/dags/{DAG}", headers=srv.headers, timeout=30).status_code != 200:
        check("DAGs parsed")
        time.sleep(1)
    while not all(_log_server_up(check("log servers"), port) for port in ports[1:]):
        time.sleep(1)
    return srv


def start_airflow(env: dict[str, str], root: Path, password: str) -> tuple[subprocess.Popen, Server]:
    """``privrec airflow`` on ports chosen free (``conftest.free_ports``), passed through the
    environment. A port taken between the choice and Airflow's bind fails the start with a bind
    error in the log: Airflow is stopped and started once more on other ports."""
    tried: set[int] = set()
    for attempt in range(1, START_ATTEMPTS + 1):
        ports = free_ports(len(AIRFLOW_PORTS), exclude=frozenset(tried))
        tried.update(ports)
        run_env = {**env, **port_env(ports)}
        log = root / f"standalone-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([PRIVREC, "airflow"], env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            return proc, _wait_until_ready(proc, log, run_env, root, password, ports)
        except PortTaken:
            _stop_group(proc)
            if attempt == START_ATTEMPTS:
                raise
        except BaseException:
            _stop_group(proc)
            raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def server(tmp_path_factory, key_document):
    """``privrec airflow`` on a fresh PostgreSQL database, with two landing days."""
    database = f"privrec_backfill_{os.getpid()}"
    from sqlalchemy.exc import OperationalError

    try:
        _postgres_database(database)
    except OperationalError as exc:  # a connection failure means: no server here
        unavailable(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__})")
    root = tmp_path_factory.mktemp("backfill")
    password = secrets.token_urlsafe(16)
    (root / "passwords.json").write_text(json.dumps({"admin": password}))
    url = f"{PG_SERVER}/{database}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIVREC"))}
    env.update({
        "PRIVREC_HOME": str(root / "airflow"),
        "PRIVREC_LAKE": str(root / "lake"),
        "PRIVREC_LEDGER_URL": url,
        "PRIVREC_KEY_FILE": str(root / "no-such-key-file.json"),  # keys only via the connection
        "AIRFLOW_CONN_PRIVREC_KEYS": json.dumps({"conn_type": "generic", "password": key_document}),
        "PRIVREC_SPARK_DRIVER_MEMORY": "1g",
        "PRIVREC_TRAIN_PARTITIONS": "2", "PRIVREC_TRAIN_ROUNDS": "2",
        "PRIVREC_TASK_RETRIES": "0",
        "PRIVREC_BUDGET_EPSILON": "1000",  # a 200-user day needs a large epsilon to release items at all
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
    })
    for n, day in enumerate(DAYS):
        generate_day(GeneratorConfig(date=day, events=3000, users=200, items=100, seed=20 + n, bad_rate=0.02),
                     env["PRIVREC_LAKE"])
    proc = None
    try:
        proc, srv = start_airflow(env, root, password)
        srv.process = proc
        yield srv
    finally:
        if proc is not None:
            _stop_group(proc)
        _postgres_database(database, drop_only=True)


@pytest.fixture(scope="module")
def backfilled(server):
    """The two days backfilled through the REST API (the DAGs unpaused, as a backfill needs)."""
    for dag_id in (DAG, BATCH_DAG):
        server.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    return server.wait_for_backfill(server.backfill(DAYS[0], DAYS[-1], "none"))


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _day_of(run: dict) -> dt.date:
    return _time(run["logical_date"]).date()


def _ledger(server: Server):
    from privrec_pipeline.privacy.ledger import Ledger, policy_from_env

    return Ledger(server.env["PRIVREC_LEDGER_URL"], policy_from_env(server.env))


def test_backfill_runs_each_day_once_in_order(backfilled):
    assert [(_day_of(r), r["run_type"], r["state"]) for r in backfilled] == [
        (day, "backfill", "success") for day in DAYS]
    # The plugin's listener noted each run's data day when the scheduler started it.
    assert [r["note"] for r in backfilled] == [f"data day {day}" for day in DAYS]
    for before, after in itertools.pairwise(backfilled):
        assert _time(after["start_date"]) >= _time(before["end_date"])  # max_active_runs=1: one day after the other


def test_backfill_ledger_accounts_each_day_once(backfilled, server):
    ledger = _ledger(server)
    releases = ledger.releases()
    run_of_day = {_day_of(r): r["dag_run_id"] for r in backfilled}
    stats = [r for r in releases if r.release_key == "dp_stats"]
    assert [(r.window_start, r.state, r.run_id) for r in stats] == [
        (day, "committed", run_of_day[day]) for day in DAYS]
    (training,) = [r for r in releases if r.release_key == "training"]
    assert (training.window_start, training.window_end, training.state, training.run_id) == (
        DAYS[0], DAYS[-1], "committed", run_of_day[DAYS[-1]])
    # The window also holds the DP partition counts and the candidate's DP evaluation.
    (population,) = [r for r in releases if r.release_key == "population"]
    (evaluation,) = [r for r in releases if r.release_key == f"evaluation-r{training.id}"]
    assert population.state == evaluation.state == "committed"
    spend = ledger.spend_at(DAYS[-1], 2)
    assert spend.basic_epsilon == pytest.approx(2 * 50 + training.epsilon + population.epsilon + evaluation.epsilon)
    # The training release costs exactly its steps (RDP of the Poisson-sampled Gaussian, by
    # dp_accounting directly), within the requested epsilon 8.
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    (steps,) = training.components
    accountant = RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(
        steps.sampling_rate, dp_event.GaussianDpEvent(steps.noise_multiplier)), steps.count)
    assert training.epsilon == pytest.approx(accountant.get_epsilon(training.delta), rel=1e-6)
    assert training.epsilon <= 8


def test_backfill_wrote_each_day_and_published_the_window_model(backfilled, server):
    for day in DAYS:
        for zone in ("silver", "dp_stats", "reports"):
            assert lk.path(lk.partition_uri(server.lake, zone, day)).is_dir(), (zone, day)
    candidates = [d for d in DAYS if lk.path(lk.partition_uri(server.lake, "candidates", d)).exists()]
    assert candidates == [DAYS[-1]]  # trained once, on the window's last day
    from privrec_pipeline.models.publish import models_root

    models = models_root(server.lake) / "privrec-recommender"
    versions = [p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(versions) == 1
    card = json.loads((versions[0] / "model_card.json").read_text())
    (training,) = [r for r in _ledger(server).releases() if r.release_key == "training"]
    assert card["created_from"]["run_id"] == backfilled[-1]["dag_run_id"] == training.run_id
    assert card["created_from"]["ledger_release"] == training.id
    assert card["privacy"]["model"]["epsilon"] == training.epsilon
    # The window per the ledger when the card was written: two days of DP statistics, the DP
    # partition counts, the training run and the candidate's DP evaluation.
    extra = [r for r in _ledger(server).releases() if r.release_key in ("population", f"evaluation-r{training.id}")]
    window = card["privacy"]["window_per_ledger"]
    assert window["releases"] == 5 and len(extra) == 2
    assert window["basic_epsilon"] == pytest.approx(2 * 50 + training.epsilon + sum(r.epsilon for r in extra))


def test_published_model_triggers_the_asset_scheduled_dag(backfilled, server):
    deadline = time.monotonic() + 300
    while not [r for r in server.runs(BATCH_DAG) if r["state"] in DONE]:
        assert time.monotonic() < deadline, "the batch DAG did not run after the model was published"
        time.sleep(2)
    (run,) = server.runs(BATCH_DAG)
    assert run["state"] == "success" and run["run_type"] == "asset_triggered"
    from privrec_pipeline.models.publish import models_root

    # Per-user output goes to the restricted serving zone, never into the published model folder.
    outputs = list((Path(server.lake) / "serving" / "recommendations").glob("dt=*/*.parquet"))
    assert len(outputs) == 1
    assert not list((models_root(server.lake) / "privrec-recommender").glob("*/batch"))


def test_a_finished_day_backfilled_again_changes_nothing(backfilled, server):
    day = DAYS[0]  # a day that does not train
    zones = [lk.path(lk.partition_uri(server.lake, z, day)) for z in ("bronze", "quarantine", "silver", "dp_stats")]
    before = [partition_snapshot(z) for z in zones]
    release_json = (zones[-1] / "release.json").read_text()
    ledger_before = _ledger(server).releases()
    # "Missing runs" would create nothing for a finished day ...
    assert server.backfill(day, day, "none", dry_run=True)["backfills"] == []
    assert len(server.backfill(day, day, "completed", dry_run=True)["backfills"]) == 1
    # ... and "all runs" runs the day again, which reuses every output and spends nothing.
    (rerun,) = server.wait_for_backfill(server.backfill(day, day, "completed"))
    (first,) = [r for r in backfilled if _day_of(r) == day]
    assert rerun["dag_run_id"] == first["dag_run_id"] and rerun["state"] == "success"
    assert _time(rerun["end_date"]) > _time(backfilled[-1]["end_date"])  # it ran again, after the backfill
    assert [partition_snapshot(z) for z in zones] == before
    assert (zones[-1] / "release.json").read_text() == release_json
    assert _ledger(server).releases() == ledger_before


def test_the_scheduled_run_of_a_day_without_data_fails_clearly(backfilled, server):
    """Unpausing made the scheduler run the latest interval, a day without landing data."""
    scheduled = [r for r in server.runs() if r["run_type"] == "scheduled"]
    assert scheduled  # one, or two if the test ran across 01:30 UTC
    for run in scheduled:
        path = f"/dags/{DAG}/dagRuns/{quote(run['dag_run_id'])}"
        deadline = time.monotonic() + 300
        while run["state"] not in DONE:
            assert time.monotonic() < deadline
            time.sleep(2)
            run = server.api("GET", path)
        assert run["state"] == "failed"
        log = server.api("GET", f"{path}/taskInstances/collect/logs/1", headers={"Accept": "application/json"})
        assert f"landing partition for {_day_of(run)} not found" in json.dumps(log)


def test_keys_never_in_logs_metadata_or_outputs(backfilled, server, keyring):
    """Task logs, the scheduler's and API server's output, the lake, and every row of the
    Airflow database (XCom, rendered fields, run conf) hold no key material."""
    import sqlalchemy as sa

    secrets_ = [s.encode() for s in keyring.secret_strings()]
    for path in server.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets_), f"key material in {path}"
    engine = sa.create_engine(server.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        with engine.connect() as conn:
            tables = conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
            assert "xcom" in tables and "rendered_task_instance_fields" in tables
            for table in tables:
                text = "\n".join(conn.execute(sa.text(f'SELECT t::text FROM "{table}" t')).scalars().all())
                assert not any(s.decode() in text for s in secrets_), f"key material in table {table}"
    finally:
        engine.dispose()


def test_backfill_dialog_in_the_ui(backfilled, server):
    """The UI's Backfill dialog: a week of new days, and the backfilled days by reprocess mode."""
    from playwright.sync_api import expect, sync_playwright

    from privrec_pipeline.browser import chromium_path

    chromium = chromium_path()
    if chromium is None:
        unavailable("no Chromium on PATH (make setup installs Debian's chromium when run as root)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.base}/dags/{DAG}")
        page.locator("input[name=username]").fill("admin")
        page.locator("input[type=password]").fill(server.password)
        page.locator("button[type=submit]").click()
        page.wait_for_url(f"**/dags/{DAG}**")
        page.get_by_role("button", name="Trigger").first.click()
        page.get_by_text("Backfill", exact=True).first.click()

        def date_range(first: str, last: str) -> None:
            for n, (label, day, time_of_day) in enumerate([("From", first, "00:00"), ("To", last, "23:59")]):
                page.get_by_test_id("datetime-input").nth(n).click()
                date_box = page.get_by_role("textbox", name=label, exact=True)
                date_box.fill(day)
                picker = date_box.locator("xpath=ancestor::*[@data-scope='popover' and @data-part='content'][1]")
                picker.get_by_placeholder("HH:mm").fill(time_of_day)
                page.get_by_text("Date Range").click()  # closes the picker
                expect(picker).to_be_hidden()

        date_range("2026/01/20", "2026/01/26")
        expect_text(page, "7 runs will be triggered.")
        page.screenshot(path=str(server.root / "backfill-dialog.png"))
        # The DAG's Params are in the form, so a backfill can force new DP releases.
        assert page.get_by_text("Force new DP releases").count() >= 1
        date_range("2025/12/29", "2025/12/30")
        expect_text(page, "No runs matching selected criteria.")
        page.get_by_text("All Runs", exact=True).click()
        expect_text(page, "2 runs will be triggered.")
        # A finished run: its data day in the note; from its validate task the extra link
        # "Quality report" to the day's page, and on to a Data Docs page.
        day, run = DAYS[-1], backfilled[-1]["dag_run_id"]
        page.goto(f"{server.base}/dags/{DAG}/runs/{quote(run)}")
        expect(page.get_by_text(f"data day {day}")).to_be_visible()
        page.screenshot(path=str(server.root / "run.png"))
        page.goto(f"{server.base}/dags/{DAG}/runs/{quote(run)}/tasks/validate/details")
        page.get_by_role("link", name="Quality report").click()
        expect(page.locator("h1")).to_contain_text(f"Data quality, {day}")
        page.screenshot(path=str(server.root / "quality-report.png"), full_page=True)
        page.get_by_role("link", name="silver").first.click()
        page.wait_for_load_state("networkidle")
        assert "/data_docs/validations/silver/" in page.url
        assert page.evaluate("typeof jQuery.fn.bootstrapTable") == "function"  # the plugin's copy, not a CDN's
        page.screenshot(path=str(server.root / "data-docs.png"), full_page=True)
        # The Privacy budget page in the UI's navigation shows this run's training release.
        (training,) = [r for r in _ledger(server).releases() if r.release_key == "training"]
        page.goto(f"{server.base}/plugin/privacy-budget")
        budget = page.frame_locator("iframe")
        expect(budget.locator("h1")).to_contain_text("Privacy budget", timeout=60000)  # charts drawn on request
        row = budget.locator("tr", has_text=run).filter(has_text="training")
        expect(row).to_contain_text(f"{training.epsilon:.4g}")
        page.screenshot(path=str(server.root / "privacy-budget.png"), full_page=True)
        # The Models page, and from it the published version's card.
        page.goto(f"{server.base}/plugin/privrec-models")
        models = page.frame_locator("iframe")
        models.get_by_text("LATEST").first.wait_for(timeout=60000)
        models.locator("td a").first.click()
        expect(models.locator("h1").first).to_contain_text("Model card")
        page.screenshot(path=str(server.root / "model-card.png"), full_page=True)
        browser.close()


def expect_text(page, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_text(text)).to_be_visible(timeout=15000)


def test_reports_and_model_cards_are_served_by_the_api_server_behind_its_login(backfilled, server):
    """privrec's plugin in the running API server: the task's extra link is an http page of
    the server, served from the lake to a logged-in user only; ``../`` gets 404."""
    from privrec_pipeline.airflow_plugin.app import model_card_url, report_url
    from privrec_pipeline.models.publish import models_root

    day, run = DAYS[-1], backfilled[-1]["dag_run_id"]
    links = server.api("GET", f"/dags/{DAG}/dagRuns/{quote(run)}/taskInstances/validate/links")["extra_links"]
    assert links["Quality report"] == report_url("quality", day, "index.html")
    page = requests.get(server.base + links["Quality report"], headers=server.headers, timeout=30)
    assert page.status_code == 200 and day.isoformat() in page.text
    assert requests.get(server.base + links["Quality report"], timeout=30).status_code == 401  # no session
    links = server.api("GET", f"/dags/{DAG}/dagRuns/{quote(run)}/taskInstances/dp_stats/links")["extra_links"]
    assert requests.get(server.base + links["DP statistics report"], headers=server.headers,
                        timeout=30).status_code == 200
    (version,) = [p.name for p in (models_root(server.lake) / "privrec-recommender").iterdir()
                  if p.is_dir() and not p.name.startswith(".")]
    card = requests.get(server.base + model_card_url("privrec-recommender", version), headers=server.headers,
                        timeout=30)
    assert card.status_code == 200 and f"Model card: privrec-recommender {version}" in card.text
    # The Privacy budget page shows this run's training release; the Models page its version.
    (training,) = [r for r in _ledger(server).releases() if r.release_key == "training"]
    budget = requests.get(server.base + "/privrec/budget", headers=server.headers, timeout=60)
    assert budget.status_code == 200 and f"<td class=n>{training.id}</td><td>training</td>" in budget.text
    assert f"{training.epsilon:.4g}" in budget.text and "<svg" in budget.text
    models = requests.get(server.base + "/privrec/models", headers=server.headers, timeout=60)
    assert models.status_code == 200 and f"{version}</a> <b>LATEST</b>" in models.text
    plugins = server.api("GET", "/plugins")["plugins"]
    (privrec,) = [p for p in plugins if p["name"] == "privrec"]
    assert {v["name"] for v in privrec["external_views"]} == {"Privacy budget", "Models"}
    for probe in (f"/privrec/reports/quality/{day}/..%2F..%2F..%2F..%2Fpasswords.json",
                  f"/privrec/reports/quality/{day}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/passwords.json",
                  "/privrec/reports/quality/2026-02-30/index.html"):
        response = requests.get(server.base + probe, headers=server.headers, timeout=30)
        assert response.status_code == 404 and server.password not in response.text, probe


def test_sigterm_to_privrec_airflow_stops_airflow_and_the_engine(backfilled, server):
    """Last in this module: SIGTERM to the `privrec airflow` process alone (as `docker stop` or
    `kill PID` sends it) stops Airflow's components and the Spark engine its tasks used."""
    import psutil

    proc = server.process
    group = [p for p in psutil.process_iter() if _in_group(p, proc.pid)]
    assert len(group) > 2  # privrec, airflow standalone and its components
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    deadline = time.monotonic() + 60
    while (left := [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()[:4]) for p in left]
    engine_home = Path(server.env["PRIVREC_HOME"]) / "engine"
    assert not (engine_home / "server.json").exists() and not (engine_home / "token").exists()


def _in_group(process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False
