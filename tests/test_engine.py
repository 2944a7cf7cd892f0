"""The warm engine: `privrec engine start` runs one Spark Connect server; the steps run on it
as thin clients (collect, pseudonymize and the quality gate's Great Expectations suite
included), two runs at once share it in separate sessions, `privrec run` uses it for every
Spark step, and a server that is down or an address that would carry keys in clear gets a
clear error."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DAY
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.spark import engine

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The embedded engine of a fresh PRIVREC_HOME, started with the CLI, stopped at the end."""
    from privrec_pipeline.cli import app

    home = tmp_path_factory.mktemp("engine-home")
    env = {"PRIVREC_HOME": str(home), engine.ENV_REMOTE: None}
    runner = CliRunner()
    # Secrets in the starter's environment: the server must get none of them.
    started = runner.invoke(app, ["engine", "start", "--driver-memory", "2g"],
                            env={**env, **SECRETS_OF_THE_STARTER, "PRIVREC_SPARK_CONF": DEPLOYMENT_CONF})
    assert started.exit_code == 0 and "started: sc://localhost:" in started.output, started.output
    again = runner.invoke(app, ["engine", "start"], env=env)
    assert "already running" in again.output
    old = os.environ.get("PRIVREC_HOME")
    os.environ["PRIVREC_HOME"] = str(home)
    try:
        state = engine.read_state()
        token = (home / "engine" / "token").read_text().strip()
        assert (home / "engine" / "token").stat().st_mode & 0o077 == 0  # the token file is the user's only
        yield {"home": home, "state": state, "token": token, "env": env}
    finally:
        stopped = runner.invoke(app, ["engine", "stop"], env=env)
        if old is None:
            os.environ.pop("PRIVREC_HOME", None)
        else:
            os.environ["PRIVREC_HOME"] = old
    assert f"stopped {state.remote}" in stopped.output and not (home / "engine" / "server.json").exists()


# A value with backslashes, '=' and ':' reaches the server unchanged through its properties file.
ODD_VALUE = "=C:\\new\\table=x #1"
DEPLOYMENT_CONF = json.dumps({"spark.sql.shuffle.partitions": "6", "spark.sql.session.timeZone": "Europe/Paris",
                              "spark.privrec.test.value": ODD_VALUE})
SECRETS_OF_THE_STARTER = {
    "PRIVREC_KEYS_JSON": "key-document-" + "a" * 64, "PRIVREC_LEDGER_URL": "postgresql://u:ledger-pw@db/ledger",
    "AIRFLOW_CONN_PRIVREC_KEYS": '{"conn_type": "generic", "password": "conn-secret"}',
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:airflow-pw@db/airflow",
}


def test_the_server_gets_no_secret_of_its_starter_and_its_settings_are_private(warm):
    """Its environment holds none of the starter's keys, database credentials or Airflow
    settings (only its own token); its settings are in a 0600 file, not on its command line."""
    import psutil

    process = psutil.Process(warm["state"].pid)
    environ = process.environ()
    assert not set(SECRETS_OF_THE_STARTER) & set(environ)
    assert not [k for k in environ if k.startswith(("AIRFLOW_", "PRIVREC_"))]
    assert environ[engine.ENV_TOKEN] == warm["token"]
    cmdline = " ".join(process.cmdline())
    assert "--conf" not in cmdline and "shuffle.partitions" not in cmdline
    properties = warm["home"] / "engine" / "server.properties"
    assert properties.stat().st_mode & 0o077 == 0 and "spark.sql.shuffle.partitions 6" in properties.read_text()
    assert (warm["home"] / "engine" / "server.json").stat().st_mode & 0o077 == 0


def test_a_key_frame_above_the_inline_size_reaches_the_server(warm):
    """The users' data keys of a large day reach the server as one local relation above Spark
    Connect's inline size (cached on the server as an artifact): it arrives whole."""
    done = _client(warm, """
import os, pyarrow as pa
from privrec_pipeline.spark.session import get_spark
spark = get_spark("test-big-frame")
table = pa.table({"data_key": [os.urandom(16).hex() for _ in range(40000)],
                  "key": [os.urandom(32) for _ in range(40000)]})
assert table.nbytes > 2_000_000
frame = spark.createDataFrame(table)
print(frame.count(), frame.selectExpr("count(distinct data_key)").first()[0])
""")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["40000", "40000"]


def test_a_server_left_by_a_starter_killed_while_it_started_is_ended(tmp_path, monkeypatch):
    """A recorded server that never listened (its starter died before it did) is ended by the
    next start or stop, never mistaken for a running engine."""
    import psutil

    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    properties = tmp_path / "engine" / "server.properties"  # a server of this home names its settings file
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", engine.SERVER_CLASS,
                               "--properties-file", str(properties)], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", engine.SERVER_CLASS,
                              "--properties-file", "/elsewhere/engine/server.properties"], start_new_session=True)
    try:
        (tmp_path / "engine").mkdir()

        def record(pid: int) -> None:
            (tmp_path / "engine" / "server.json").write_text(json.dumps(
                {"pid": pid, "port": 1, "remote": "sc://localhost:1", "master": "local[*]", "log": "x",
                 "started": time.time(), "owner": "task"}))

        record(other.pid)  # a reused pid: another home's server is never signalled
        assert engine.stop() is None and other.poll() is None
        record(orphan.pid)
        assert engine.read_state() is None  # not listening: not a running engine
        assert engine.stop() is None
        orphan.wait(timeout=30)
        assert orphan.returncode == -9 and not (tmp_path / "engine" / "server.json").exists()
    finally:
        for process in (orphan, other):
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()


def _client(warm: dict, code: str, *args: str) -> subprocess.CompletedProcess:
    """A fresh Python process (a job's thin client) running ``code`` against the engine."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           engine.ENV_REMOTE: warm["state"].remote, engine.ENV_TOKEN: warm["token"]}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


INGEST = """
import datetime as dt, json, sys
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.validate import run_validate
from privrec_pipeline.secrets import parse_key_document
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.spark.session import get_spark
lake, day, doc = sys.argv[1], dt.date.fromisoformat(sys.argv[2]), sys.argv[3]
spark = get_spark("test-client")
assert type(spark).__module__.startswith("pyspark.sql.connect"), type(spark)
spark.conf.set("privrec.test.client", sys.argv[2])  # one session's setting
generate_day(GeneratorConfig(date=day, events=600, users=60, items=40, bad_rate=0.02), lake)
keys = parse_key_document(doc, "test")
collected = run_collect(spark, lake, day, keys)
silver = run_pseudonymize(spark, lake, day, keys)
gate = run_validate(spark, lake, day, QualityConfig()).gate
print(json.dumps({"landing": collected.landing_records, "bronze": collected.bronze_records,
                  "silver": silver.silver_records, "gate": gate, "mine": spark.conf.get("privrec.test.client"),
                  "timezone": spark.conf.get("spark.sql.session.timeZone"),
                  "shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions"),
                  "odd_value": spark.conf.get("spark.privrec.test.value")}))
"""


def test_two_runs_at_once_share_the_engine_in_separate_sessions(warm, tmp_path, key_document):
    """Two clients collect, pseudonymize and validate a day each at the same time on one server:
    both balance, the quality gate (Great Expectations on Connect DataFrames) passes, and
    neither sees the other's session settings."""
    days = [DAY, DAY + dt.timedelta(days=1)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           engine.ENV_REMOTE: warm["state"].remote, engine.ENV_TOKEN: warm["token"]}
    procs = [subprocess.Popen([sys.executable, "-c", INGEST, str(tmp_path / f"lake{i}"), day.isoformat(), key_document],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, day in enumerate(days)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for day, result in zip(days, results, strict=True):
        assert result["mine"] == day.isoformat() and result["timezone"] == "UTC"
        # The deployment's settings win over privrec's session defaults, except UTC days.
        assert result["shuffle_partitions"] == "6" and result["odd_value"] == ODD_VALUE
        assert result["landing"] >= 600 and result["silver"] == result["bronze"] > 500 and result["gate"] == "passed"


def test_a_server_that_is_down_names_how_to_start_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    code = ("from privrec_pipeline.spark.session import get_spark\n"
            "try:\n    get_spark('x')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), engine.ENV_REMOTE: f"sc://localhost:{port}",
           engine.ENV_TOKEN: "t" * 32}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("EngineUnavailableError"), out
    assert f"sc://localhost:{port} does not answer (Connection refused): start it with `privrec engine start`" in out


@pytest.mark.parametrize("remote, token, message", [
    ("sc://10.1.2.3:15002", "t", "needs use_ssl=true"),
    ("sc://127.0.0.1:15002", "t", "not this machine's 'localhost'"),
    ("sc://localhost:15002", "", "needs a token"),
    ("http://localhost:15002", "t", "must be a Spark Connect address"),
])
def test_addresses_that_would_carry_keys_in_clear_are_refused(remote, token, message):
    with pytest.raises(ConfigurationError, match=message):
        engine.remote_settings({engine.ENV_REMOTE: remote, engine.ENV_TOKEN: token})
    assert engine.remote_settings({engine.ENV_REMOTE: "sc://spark.example:443/;use_ssl=true",
                                   engine.ENV_TOKEN: "t"}) == ("sc://spark.example:443/;use_ssl=true", "t")
    assert engine.remote_settings({}) is None


def test_a_client_without_the_token_is_refused(warm):
    result = _client({**warm, "token": "not-the-token"}, "from privrec_pipeline.spark.session import get_spark\n"
                                                          "get_spark('x').range(3).count()\n")
    assert result.returncode != 0 and "UNAUTHENTICATED" in result.stderr


def test_privrec_run_runs_every_spark_step_on_a_running_engine_and_leaves_it_running(warm, tmp_path):
    """`privrec run` on the embedded default with the engine started: the five Spark steps run
    as thin clients of that server, the day completes, and the engine stays up."""
    env = {**os.environ, "PRIVREC_HOME": str(warm["home"]), "PRIVREC_LAKE": str(tmp_path / "lake"),
           "PRIVREC_KEY_FILE": str(tmp_path / "keys.json"), "PYTHONPATH": str(ROOT)}
    env.pop(engine.ENV_REMOTE, None)
    privrec = [str(Path(sys.executable).parent / "privrec")]
    for args in (["keys", "init"], ["generate", "--date", DAY.isoformat(), "--events", "1000", "--users", "200",
                                    "--items", "100"]):
        subprocess.run([*privrec, *args], env=env, check=True, capture_output=True, timeout=300)
    run = subprocess.run([*privrec, "run", "--date", DAY.isoformat(), "-p", "train_window_days=1"], env=env,
                         capture_output=True, text=True, timeout=1200)
    log = (warm["home"] / "runs" / f"privrec_nightly-{DAY}.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-2000:] + log[-3000:]
    on_engine = {line.split("running ")[1].split(".py")[0] for line in log.splitlines()
                 if f"on the Spark Connect server {warm['state'].remote}" in line and "running " in line}
    assert on_engine == {"collect", "pseudonymize", "validate", "dp_stats", "build_partitions"}
    assert "spark-submit" not in log
    assert engine.read_state() == warm["state"]  # an engine the run did not start is left running
