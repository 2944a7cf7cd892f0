"""The Spark operator's key injection and the local runner's error reporting."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from privrec_pipeline.orchestration.local import airflow_env, failure_reasons

LOG = """\
2026-11-25T22:20:11Z [info     ] Traceback (most recent call last): [airflow.task.hooks.x] loc=spark_submit.py:965
2026-11-25T22:20:11Z [info     ] privrec_pipeline.errors.LandingPartitionError: landing partition for 2026-02-01 not found: /lake/landing/interactions/dt=2026-02-01 [airflow.task.hooks.airflow.providers.apache.spark.hooks.spark_submit.SparkSubmitHook] loc=spark_submit.py:965
privrec_pipeline.errors.LandingPartitionError: landing partition for 2026-02-01 not found: /lake/landing/interactions/dt=2026-02-01
airflow.exceptions.AirflowException: Cannot execute: spark-submit ... Error code is: 1.
"""


def test_failure_reasons_prefer_privrec_errors_and_strip_log_decoration():
    assert failure_reasons(LOG) == [
        "LandingPartitionError: landing partition for 2026-02-01 not found: /lake/landing/interactions/dt=2026-02-01"
    ]


def test_failure_reasons_fall_back_to_other_exceptions():
    assert failure_reasons("ValueError: bad thing\nok line\n") == ["ValueError: bad thing"]


def test_embedded_env_keeps_user_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", '{"conn_type": "spark", "host": "spark://m:7077"}')
    monkeypatch.setenv("PRIVREC_LAKE", str(tmp_path))
    env = airflow_env()
    assert env["AIRFLOW_CONN_SPARK_DEFAULT"].endswith('"spark://m:7077"}')
    assert env["PRIVREC_LAKE"] == str(tmp_path)
    assert env["PATH"].split(os.pathsep)[0].endswith("bin")  # airflow and spark-submit of the venv first
    # A base environment's PRIVREC_HOME (a deployment's) decides the Airflow home and its logs.
    given = airflow_env({"PRIVREC_HOME": str(tmp_path / "home")})
    assert given["AIRFLOW_HOME"] == str(tmp_path / "home")
    assert given["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] == str(tmp_path / "home" / "logs")


JOB = """import fcntl, json, os, sys
seen = {"args": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
        if k.startswith(("PRIVREC_KEY", "PRIVREC_SPARK_REMOTE", "SPARK_CONNECT", "AIRFLOW_CONN_"))}}
users = os.path.join(os.environ["PRIVREC_HOME"], "engine", "users")
if os.path.exists(users):  # the task's lease on the engine, held while the job runs
    fd = os.open(users, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen["lease_held"] = False
    except BlockingIOError:
        seen["lease_held"] = True
open(os.environ["SEEN_FILE"], "w").write(json.dumps(seen))
print("a line of the job")
sys.exit(int(os.environ.get("JOB_EXIT", "0")))
"""


@pytest.fixture()
def operator(monkeypatch, tmp_path):
    """The operator running a job script that records its arguments and environment; the
    engine's start is recorded, not run (the engine itself: tests/test_engine.py)."""
    from privrec_pipeline.orchestration.spark_operator import PrivrecSparkOperator
    from privrec_pipeline.spark import engine

    started: dict = {}

    def fake_start(*, master, driver_memory=None, conf=None, owner="manual", **_):
        started.update(master=master, conf=conf)
        assert owner == "task" and driver_memory == "4g"
        return engine.EngineState(1, 15002, "sc://localhost:15002", master, "log", 0.0), True, "t" * 64

    monkeypatch.setattr(engine, "start", fake_start)
    monkeypatch.delenv("PRIVREC_SPARK_DRIVER_MEMORY", raising=False)
    for name in ("PRIVREC_SPARK_REMOTE", "PRIVREC_SPARK_CONF", "PRIVREC_KEYS_JSON", "PRIVREC_KEY_FILE",
                 "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRIVREC_LAKE", str(tmp_path / "lake"))
    monkeypatch.setenv("SEEN_FILE", str(tmp_path / "seen.json"))
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "home"))
    job = tmp_path / "collect.py"
    job.write_text(JOB)
    op = PrivrecSparkOperator(task_id="t", application=str(job), application_args=["--date", "2026-01-15"])
    return op, started, lambda: json.loads((tmp_path / "seen.json").read_text())


def _connections(monkeypatch, master: str, keys: str | None) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": master}))
    if keys is None:
        monkeypatch.delenv("AIRFLOW_CONN_PRIVREC_KEYS", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW_CONN_PRIVREC_KEYS", json.dumps({"conn_type": "generic", "password": keys}))


def test_a_job_runs_on_the_engine_it_starts_with_the_keys_as_their_own_variable(monkeypatch, operator, key_document,
                                                                              tmp_path, capsys):
    """The embedded default: the engine is started with the connection's master; the job gets
    the lake, the engine's address and token, and the key document of privrec_keys as
    PRIVREC_KEYS_JSON, but no Airflow connection variable (they hold keys and partition secrets)."""
    op, started, seen = operator
    _connections(monkeypatch, "local[*]", key_document)
    monkeypatch.setenv("AIRFLOW_CONN_PRIVREC_PARTITION_0", json.dumps({"conn_type": "generic", "password": "p0"}))
    op.execute({})
    assert started == {"master": "local[*]", "conf": {}}
    assert seen() == {"args": ["--date", "2026-01-15", "--lake", str(tmp_path / "lake")],
                      "env": {"PRIVREC_KEYS_JSON": key_document, "PRIVREC_SPARK_REMOTE": "sc://localhost:15002",
                              "SPARK_CONNECT_AUTHENTICATE_TOKEN": "t" * 64},
                      "lease_held": True}  # a run ending meanwhile does not stop the engine under the job
    logged = capsys.readouterr().out
    assert "running collect.py on the Spark Connect server sc://localhost:15002" in logged
    assert "started the Spark engine sc://localhost:15002 (master local[*]" in logged
    assert "a line of the job" in logged


def test_a_job_without_keys_gets_no_key_material_at_all(monkeypatch, operator, key_document, tmp_path):
    op, _, seen = operator
    _connections(monkeypatch, "local[*]", key_document)
    monkeypatch.setenv("PRIVREC_KEYS_JSON", key_document)
    monkeypatch.setenv("PRIVREC_KEY_FILE", str(tmp_path / "keys.json"))
    op.needs_keys = False
    op.execute({})
    assert set(seen()["env"]) == {"PRIVREC_SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN"}


def test_without_key_connection_the_job_uses_the_workers_own_keys(monkeypatch, operator, tmp_path):
    op, _, seen = operator
    _connections(monkeypatch, "local[*]", None)
    monkeypatch.setenv("PRIVREC_KEY_FILE", str(tmp_path / "keys.json"))
    op.execute({})
    assert seen()["env"]["PRIVREC_KEY_FILE"] == str(tmp_path / "keys.json")
    assert "PRIVREC_KEYS_JSON" not in seen()["env"]


def test_a_dags_test_log_without_the_collect_task_is_not_a_run():
    from privrec_pipeline.orchestration.local import ran_collect

    ran = ("2026-12-02T05:40:01 [info] [DAG TEST] starting task_id=collect map_index=-1 [airflow.sdk] loc=dag.py:1501\n"
           "2026-12-02T05:40:20 [info] [DAG TEST] end task task_id=collect map_index=-1\n")
    assert ran_collect(ran) and ran_collect(ran.replace("task_id=collect", "task_id=ingest.collect"))
    # What Airflow prints for a logical date before the DAG's start date: success, no task.
    assert not ran_collect("2026-12-02T05:40:01 [info] Dag run succeeded\n")
    assert not ran_collect("[DAG TEST] starting task_id=collect_report map_index=-1\n")


def test_a_backfill_runs_its_days_in_order_and_stops_at_the_first_failure(monkeypatch, tmp_path):
    """`privrec backfill`: one `dags test` per day, in order; a failed day stops the backfill and
    the message says which days are done and where to rerun from."""
    from typer.testing import CliRunner

    from privrec_pipeline import reporting
    from privrec_pipeline.cli import app
    from privrec_pipeline.orchestration import local

    ran: list[str] = []
    summaries: list[str] = []

    def dags_test(dag_id, day, env, log, conf=None):
        ran.append(day)
        assert conf == {"allow_empty": False, "train_window_days": 3}
        log.write_text("[DAG TEST] starting task_id=collect map_index=-1\n")
        return 1 if day == "2026-01-03" else 0

    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    monkeypatch.setattr(local, "airflow_env", lambda: {"PRIVREC_LAKE": str(tmp_path / "lake")})
    monkeypatch.setattr(local, "ensure_metadata_db", lambda env, log: None)
    monkeypatch.setattr(local, "dags_test", dags_test)
    monkeypatch.setattr(reporting, "print_run_summary", lambda console, lake, day, log: summaries.append(str(day)))
    from privrec_pipeline import lake as lk

    # A day without landing data is refused before Airflow runs anything, naming every such day.
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-01-01", "--end", "2026-01-02"])
    assert result.exit_code == 1 and ran == []
    for day in ("2026-01-01", "2026-01-02"):
        assert f"landing partition for {day} not found" in result.output
    assert "nothing was run" in result.output
    for n in range(1, 6):
        folder = lk.path(lk.partition_uri(str(tmp_path / "lake"), "landing", dt.date(2026, 1, n)))
        folder.mkdir(parents=True)
        if n != 5:
            (folder / "events.jsonl").write_text("{}\n")
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-01-04", "--end", "2026-01-05"])
    assert result.exit_code == 1 and ran == [] and "landing partition for 2026-01-05 has no data files" in result.output
    (folder / "events.jsonl").write_text("{}\n")
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-01-01", "--end", "2026-01-04",
                                      "-p", "train_window_days=3"])
    assert result.exit_code == 1
    assert ran == ["2026-01-01", "2026-01-02", "2026-01-03"] and summaries == ran
    assert "privrec_nightly failed for 2026-01-03" in result.output
    assert "2026-01-01 .. 2026-01-02 are done, rerun from 2026-01-03" in result.output

    ran.clear()
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-01-04", "--end", "2026-01-05",
                                      "-p", "train_window_days=3"])
    assert result.exit_code == 0, result.output
    assert ran == ["2026-01-04", "2026-01-05"]
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-01-05", "--end", "2026-01-04"])
    assert result.exit_code == 1 and "is before --start" in result.output


def test_a_standalone_master_given_as_a_uri_starts_the_engine_with_the_settings(monkeypatch, operator):
    """spark://host:port (a URI connection: conn_type spark, host without scheme): the engine's
    master; the connection's extra conf and PRIVREC_SPARK_CONF (which wins) are its settings."""
    op, started, _ = operator
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT",
                       "spark://127.0.0.1:7077?conf=%7B%22spark.executor.cores%22%3A+%221%22%7D")
    monkeypatch.setenv("PRIVREC_SPARK_CONF", '{"spark.executor.memory": "1g", "spark.executor.cores": "2"}')
    op.execute({})
    assert started == {"master": "spark://127.0.0.1:7077",
                       "conf": {"spark.executor.memory": "1g", "spark.executor.cores": "2"}}


@pytest.mark.parametrize("setting, message", [
    ("not json", "PRIVREC_SPARK_CONF is not JSON"),
    ('{"executor.memory": "1g"}', "keys are Spark settings"),
    ('["spark.x"]', "one JSON object"),
    ('{"spark.executor.memory": null, "spark.x": {"a": 1}}', "spark.executor.memory, spark.x must be one-line"),
    ('{"spark.x\\nspark.y": "1"}', "keys are Spark settings"),
    ('{"spark.x": "a\\nspark.connect.grpc.binding.address 0.0.0.0"}', "spark.x must be one-line"),
    ('{"spark.io.encryption.enabled": true}', "spark.io.encryption.enabled cannot be set"),
])
def test_bad_spark_settings_are_refused_naming_the_variable(monkeypatch, operator, setting, message, tmp_path):
    from airflow.exceptions import AirflowException

    op, started, _ = operator
    _connections(monkeypatch, "local[2]", None)
    monkeypatch.setenv("PRIVREC_SPARK_CONF", setting)
    with pytest.raises(AirflowException, match=message):
        op.execute({})
    assert not started and not (tmp_path / "seen.json").exists()


def test_cluster_deploy_mode_is_refused_with_the_reason(monkeypatch, operator, tmp_path):
    from airflow.exceptions import AirflowException

    op, started, _ = operator
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", "spark://127.0.0.1:7077?deploy-mode=cluster")
    monkeypatch.delenv("AIRFLOW_CONN_PRIVREC_KEYS", raising=False)
    with pytest.raises(AirflowException, match="runs its driver on the Airflow worker"):
        op.execute({})
    assert not started and not (tmp_path / "seen.json").exists()


def _failure_context():
    from types import SimpleNamespace

    ti = SimpleNamespace(dag_id="privrec_nightly", task_id="dp_stats", run_id="scheduled__1999-12-31", try_number=2)
    return {"ti": ti, "exception": RuntimeError("the ledger refused the release\nsecond line")}


def test_the_failure_notifier_logs_the_task_and_the_error(monkeypatch, capsys, caplog):
    from privrec_pipeline.orchestration.notify import FailureNotifier

    monkeypatch.delenv("PRIVREC_ALERT_EMAIL", raising=False)
    with caplog.at_level("ERROR", logger="privrec_pipeline.orchestration.notify"):
        FailureNotifier().notify(_failure_context())
    logged = caplog.text + "".join(capsys.readouterr())  # Airflow's log setup may route records to stdout
    assert "privrec: privrec_nightly.dp_stats failed (scheduled__1999-12-31), try 2: the ledger refused the release" \
        in logged and "second line" not in logged


def test_the_failure_notifier_emails_through_the_smtp_connection(monkeypatch):
    import smtplib

    from privrec_pipeline.orchestration.notify import FailureNotifier

    sent = []

    class FakeSMTP:
        def __init__(self, host, port, **kwargs):
            sent.append(("connect", host, port))

        def __getattr__(self, name):  # ehlo, starttls, login, quit: accepted
            return lambda *args, **kwargs: None

        def sendmail(self, from_addr, to_addrs, msg):
            sent.append(("mail", to_addrs, msg))

    monkeypatch.setattr(smtplib, "SMTP", FakeSMTP)
    monkeypatch.setenv("AIRFLOW_CONN_PRIVREC_ALERTS_SMTP",
                       json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": 2525,
                                   "extra": {"disable_ssl": True, "disable_tls": True,
                                             "from_email": "privrec@example.org"}}))
    monkeypatch.setenv("PRIVREC_ALERT_EMAIL", "ops@example.org, oncall@example.org")
    FailureNotifier().notify(_failure_context())
    assert ("connect", "127.0.0.1", 2525) in sent
    [(_, recipients, message)] = [s for s in sent if s[0] == "mail"]
    assert recipients == ["ops@example.org", "oncall@example.org"]
    assert "privrec: privrec_nightly.dp_stats failed" in message


JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")


@pytest.mark.parametrize("body, code, said", [
    ("return 0", 0, ""),
    ("return 3", 3, ""),
    ("raise ValueError('no landing partition')", 1, "ValueError: no landing partition"),
    ("raise SystemExit(2)", 2, ""),
    ("raise SystemExit('usage: bad --date')", 1, "usage: bad --date"),
])
def test_a_job_leaves_with_its_own_exit_code_whatever_the_teardown_does(body, code, said):
    """A job's exit code is its main's, even when something at interpreter exit would abort
    the process (a native thread torn down at exit: exit 134 after the step committed)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import atexit, os, sys
        sys.path.insert(0, {JOBS!r})
        from _common import run
        atexit.register(os.abort)  # what a crashing teardown does
        def main():
            print("step done", flush=True)
            {body}
        run(main)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert "step done" in done.stdout and said in done.stderr


def test_a_server_run_elsewhere_is_used_as_given_and_a_failing_job_fails_the_task(monkeypatch, operator,
                                                                                key_document):
    """With PRIVREC_SPARK_REMOTE set, no engine is started: the job runs on that server; a
    failing job fails the task with its exit code and last lines; an address that would carry
    keys in clear is refused before the job runs."""
    from airflow.exceptions import AirflowException

    op, started, seen = operator
    _connections(monkeypatch, "local[2]", key_document)
    monkeypatch.setenv("PRIVREC_SPARK_REMOTE", "sc://localhost:15003")
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", "u" * 64)
    op.execute({})
    assert not started and "lease_held" not in seen()  # a server run elsewhere: no lease, nothing started
    assert seen()["env"]["PRIVREC_SPARK_REMOTE"] == "sc://localhost:15003"
    assert seen()["env"]["SPARK_CONNECT_AUTHENTICATE_TOKEN"] == "u" * 64
    monkeypatch.setenv("JOB_EXIT", "3")
    with pytest.raises(AirflowException, match=r"collect.py failed on the Spark Connect server sc://localhost:15003 "
                                               r"\(exit 3\): a line of the job"):
        op.execute({})
    monkeypatch.setenv("PRIVREC_SPARK_REMOTE", "sc://10.0.0.9:15002")
    with pytest.raises(AirflowException, match="needs use_ssl=true"):
        op.execute({})


def test_the_providers_spark_connect_connection_names_a_server_run_elsewhere(monkeypatch, operator):
    """Without PRIVREC_SPARK_REMOTE, the Spark provider's spark_connect_default connection (host,
    port, extra use_ssl; its password the token, so a secrets backend can hold it) is the
    server: nothing is started, the token reaches the job in its own variable, never in the
    address; without TLS a host other than localhost is refused."""
    from airflow.exceptions import AirflowException

    op, started, seen = operator
    _connections(monkeypatch, "local[*]", None)
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_CONNECT_DEFAULT", json.dumps({
        "conn_type": "spark_connect", "host": "engine.internal", "port": 15010, "password": "v" * 64,
        "extra": {"use_ssl": True}}))
    op.execute({})
    assert not started
    assert seen()["env"] == {"PRIVREC_SPARK_REMOTE": "sc://engine.internal:15010/;use_ssl=true",
                             "SPARK_CONNECT_AUTHENTICATE_TOKEN": "v" * 64}
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_CONNECT_DEFAULT", json.dumps({
        "conn_type": "spark_connect", "host": "engine.internal", "port": 15010, "password": "v" * 64}))
    with pytest.raises(AirflowException, match="needs use_ssl=true"):
        op.execute({})
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_CONNECT_DEFAULT", json.dumps({
        "conn_type": "spark_connect", "host": "localhost", "port": 15010}))
    with pytest.raises(AirflowException, match="needs a token"):
        op.execute({})


def test_a_run_stops_the_engine_only_when_no_other_run_uses_it_and_never_one_started_by_hand(monkeypatch, tmp_path):
    """`privrec run` / `backfill` / `airflow` hold a lease on the embedded engine: at the end an
    engine a run or a task started is stopped only if no other command holds one; an engine
    started by hand is left running."""
    from privrec_pipeline import cli
    from privrec_pipeline.spark import engine

    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    monkeypatch.delenv("PRIVREC_SPARK_REMOTE", raising=False)
    stopped, owner = [], {"value": "task"}
    monkeypatch.setattr(engine, "read_state", lambda: engine.EngineState(
        1, 15002, "sc://localhost:15002", "local[*]", "log", 0.0, owner["value"]))
    monkeypatch.setattr(engine, "stop", lambda: stopped.append(1))
    env = {"AIRFLOW_CONN_SPARK_DEFAULT": "spark://elsewhere:7077"}  # no start in the background
    with engine.run_lease():  # another run uses the engine
        with cli._embedded_engine(env, keep=False):
            pass
    assert not stopped
    with cli._embedded_engine(env, keep=False):
        pass
    assert stopped == [1]
    owner["value"] = "manual"
    with cli._embedded_engine(env, keep=False):
        pass
    assert stopped == [1]


def test_the_lease_tells_the_last_holder(monkeypatch, tmp_path):
    from privrec_pipeline.spark import engine

    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    with engine.run_lease() as first:
        with engine.run_lease() as second:
            assert not second()
        assert first()


def test_starting_a_running_engine_by_hand_keeps_it_until_stopped_by_hand(monkeypatch, tmp_path):
    from privrec_pipeline.spark import engine

    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    running = engine.EngineState(1, 15002, "sc://localhost:15002", "local[*]", "log", 0.0, "run")
    monkeypatch.setattr(engine, "read_state", lambda: running)
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "token").write_text("t" * 64 + "\n")
    state, started, token = engine.start(owner="manual")
    assert not started and state.owner == "manual" and token == "t" * 64
    assert json.loads((tmp_path / "engine" / "server.json").read_text())["owner"] == "manual"
