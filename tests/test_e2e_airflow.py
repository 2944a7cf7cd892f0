"""End to end: ``privrec run`` = ``airflow dags test privrec_nightly D`` on the embedded
default (SQLite metadata, the Spark steps on the engine ``privrec run`` starts and stops),
keys from the Airflow connection ``privrec_keys``. A second run of the same day, with
``--keep-engine``, changes no output."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import partition_snapshot
from privrec_pipeline import lake as lk
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

pytestmark = pytest.mark.airflow
PRIVREC = str(Path(sys.executable).parent / "privrec")
# A day of the last century: history of any age runs (Airflow marks a run of a logical date
# before the DAG's start date successful without running any task).
DAY = dt.date(1999, 12, 31)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, key_document):
    root = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRIVREC"))}
    env.update({
        "PRIVREC_HOME": str(root / "airflow"),
        "PRIVREC_LAKE": str(root / "lake"),
        "PRIVREC_KEY_FILE": str(root / "no-such-key-file.json"),  # keys only via the connection
        "AIRFLOW_CONN_PRIVREC_KEYS": json.dumps({"conn_type": "generic", "password": key_document}),
        "PRIVREC_SPARK_DRIVER_MEMORY": "1g",
        "PRIVREC_TRAIN_PARTITIONS": "2", "PRIVREC_TRAIN_ROUNDS": "2",
        "PRIVREC_BUDGET_EPSILON": "1000",  # a 200-user day needs a large epsilon to release items at all
    })
    generate_day(GeneratorConfig(date=DAY, events=3000, users=200, items=100, seed=5, bad_rate=0.02),
                 env["PRIVREC_LAKE"])
    started = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    first = subprocess.run(RUN, env=env, capture_output=True, text=True, timeout=900)
    first.wall_clock = (started, dt.datetime.now(dt.UTC).replace(tzinfo=None))
    return root, env, first


RUN = [PRIVREC, "run", "--date", DAY.isoformat(), "-p", "dp_epsilon=50", "-p", "train_window_days=1",
       "-p", "train_epsilon=8", "-p", 'train_settings={"local_steps": 3, "batch_size": 20, "dim": 16}']


def test_run_succeeds_and_prints_summary(embedded):
    _, _, first = embedded
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for expected in ("landing records", "3,000", "quarantined", "silver records", "silver:", "quality gate",
                     "passed (", "quality:", "DP release", "privacy budget", "dp stats:", "candidate model",
                     "2 x 2", "candidate:", "published model", "training audit", "(fingerprint "):
        assert expected in first.stdout


def test_every_spark_step_ran_on_the_engine_the_run_started_and_stopped(embedded):
    """No engine ran before: `privrec run` started one (local[*]), every Spark step was a thin
    client of it, and it was stopped at the end (no server left, its token file gone)."""
    root, _, _ = embedded
    log = (root / "airflow" / "runs" / f"privrec_nightly-{DAY}.log").read_text(errors="replace")
    on_engine = {line.split("running ")[1].split(".py")[0] for line in log.splitlines()
                 if "on the Spark Connect server sc://localhost:" in line and "running " in line}
    assert on_engine == {"collect", "pseudonymize", "validate", "dp_stats", "build_partitions"}
    assert "spark-submit" not in log
    engine_home = root / "airflow" / "engine"
    assert not (engine_home / "server.json").exists() and not (engine_home / "token").exists()
    assert "SparkConnectServer" not in _processes_of(engine_home)


def _processes_of(engine_home: Path) -> str:
    """Command lines of the processes whose log is in ``engine_home`` (the engine's server)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "open_files"]):
        files = process.info.get("open_files") or []
        if any(str(engine_home) in f.path for f in files):
            found.append(" ".join(process.info.get("cmdline") or []))
    return "\n".join(found)


def test_validate_report_is_reachable_from_the_task(embedded):
    """The day's report exists, and the task's XCom and extra link point at it."""
    import sqlite3

    root, env, _ = embedded
    report = lk.path(lk.partition_uri(env["PRIVREC_LAKE"], "reports", DAY))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["gate"] == "passed" and summary["run_id"].startswith("manual__")
    db = sqlite3.connect(root / "airflow" / "airflow.db")
    rows = dict(db.execute(
        "SELECT x.key, x.value FROM xcom x JOIN dag_run d ON d.id = x.dag_run_id "
        "WHERE d.dag_id = 'privrec_nightly' AND x.task_id = 'validate'").fetchall())
    # XCom: where the report is in the lake; the link: its page in the Airflow API server.
    assert json.loads(rows["quality_report"]) == f"{report}/index.html"
    assert json.loads(rows["_link_QualityReportLink"]) == f"/privrec/reports/quality/{DAY}/index.html"


def _ledger_rows(root: Path) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(root / "lake" / "_ledger" / "ledger.db")
    return db.execute("SELECT id, release_key, state, run_id FROM privacy_releases ORDER BY id").fetchall()


def test_dp_release_is_accounted_and_reachable_from_the_task(embedded):
    import sqlite3

    root, env, _ = embedded
    gold = lk.path(lk.partition_uri(env["PRIVREC_LAKE"], "dp_stats", DAY))
    release = json.loads((gold / "release.json").read_text())
    assert release["run_id"].startswith("manual__") and release["dag_id"] == "privrec_nightly"
    (release_id, key, state, run_id), population, training, evaluation = _ledger_rows(root)
    assert (release_id, key, state, run_id) == (release["release_id"], "dp_stats", "committed", release["run_id"])
    # Then the DP partition counts, the training run and the candidate's DP evaluation.
    assert population[1:] == ("population", "committed", run_id)
    assert training[1:] == ("training", "committed", run_id)
    assert evaluation[1:] == (f"evaluation-r{training[0]}", "committed", run_id)
    db = sqlite3.connect(root / "airflow" / "airflow.db")
    rows = dict(db.execute(
        "SELECT x.key, x.value FROM xcom x JOIN dag_run d ON d.id = x.dag_run_id "
        "WHERE d.dag_id = 'privrec_nightly' AND x.task_id = 'dp_stats'").fetchall())
    assert json.loads(rows["dp_stats_report"]) == f"{gold}/report.html"
    assert json.loads(rows["_link_DPStatsReportLink"]) == f"/privrec/reports/dp_stats/{DAY}"


def test_federated_training_wrote_an_accounted_candidate(embedded):
    root, env, _ = embedded
    lake = env["PRIVREC_LAKE"]
    manifest = json.loads(lk.path(lk.manifest_uri(lake, "build_partitions", DAY)).read_text())
    assert sorted(manifest["partitions"]) == ["0", "1"] and manifest["vocabulary_size"] > 0
    candidate = lk.path(lk.partition_uri(lake, "candidates", DAY)) / "model"
    report = json.loads((candidate / "training.json").read_text())
    assert report["partitions"] == 2 and report["config"]["rounds"] == 2
    assert report["plan"]["epsilon"] <= 8.0 * 1.001 and len(report["plan"]["epsilon_per_partition"]) == 2
    assert (candidate / "model.safetensors").stat().st_size > 0
    run = candidate.parent / "run"
    # The aggregator's inputs are masked: every round has exactly one masked vector per partition.
    for r in range(2):
        assert sorted(p.name for p in (run / f"round={r}" / "masked").iterdir()) == [
            "partition=0.npz", "partition=1.npz"]
    # Partition secrets stay with the partition workers, outside the lake.
    assert not any("partition-secrets" in str(p) for p in Path(lake).rglob("*"))
    assert len(list((root / "airflow" / "partition-secrets").glob("partition-*.key"))) == 2


def test_manifests_and_partitions_written(embedded):
    root, _, _ = embedded
    lake = str(root / "lake")
    collect = json.loads(lk.path(lk.manifest_uri(lake, "collect", DAY)).read_text())
    pseudo = json.loads(lk.path(lk.manifest_uri(lake, "pseudonymize", DAY)).read_text())
    assert collect["landing_records"] == 3000 and collect["balanced"]
    assert pseudo["silver_records"] == collect["bronze_records"] > 2800
    assert collect["run_id"].startswith("manual__")  # the Airflow run id reached the job


def test_keys_never_in_logs_metadata_or_outputs(embedded, keyring):
    root, _, first = embedded
    secrets = [s.encode() for s in keyring.secret_strings()]
    assert not any(s.decode() in first.stdout + first.stderr for s in secrets)
    for path in root.rglob("*"):
        if path.is_file():  # run logs, task logs, the SQLite metadata DB (XCom, rendered fields), lake
            data = path.read_bytes()
            assert not any(s in data for s in secrets), f"key material in {path}"


def test_exact_training_and_evaluation_numbers_never_reach_logs_or_the_airflow_database(embedded):
    """What train_partition computed (mean losses, clipped shares, Poisson batch sizes) and the
    exact hold-out metrics exist only with the workers and in the operator's
    record: no task log, run log or Airflow table (XCom, rendered fields) holds them."""
    from privrec_pipeline.models.publish import operator_record

    root, env, first = embedded
    workers = root / "airflow" / "partition-secrets"
    exact: set[str] = set()
    for note in workers.glob("masked/*.diagnostics.json"):
        exact |= {repr(v) for v in json.loads(note.read_text()).values()}
    evaluation = json.loads(operator_record(env["PRIVREC_LAKE"], DAY).read_text())["evaluation"]["exact"]
    exact |= {repr(v) for model in ("candidate", "dp_popularity") for v in evaluation[model].values()}
    distinctive = {v for v in exact if len(v.lstrip("-").replace(".", "").lstrip("0")) >= 6}  # not 0.5, 12.0
    assert len(distinctive) >= 6, exact  # the diagnostics of 2 partitions x 2 rounds and the metrics
    lake = Path(env["PRIVREC_LAKE"]).resolve()
    scanned = []
    for path in root.rglob("*"):
        if not path.is_file() or path.resolve().is_relative_to(lake) or path.is_relative_to(workers):
            continue  # the lake's operator zones and the workers' private notes may hold them
        text = path.read_bytes().decode("utf-8", errors="ignore")
        scanned.append(path.name)
        leaked = [v for v in distinctive if v in text]
        assert not leaked, f"exact numbers {leaked} in {path}"
    # The metadata database (XCom, rendered fields, task instances) and the run's task log.
    assert "airflow.db" in scanned and any(name.endswith(".log") for name in scanned), scanned
    assert not any(v in first.stdout + first.stderr for v in distinctive)


def test_the_run_shows_its_data_day_and_its_true_start_in_airflow(embedded):
    """``airflow dags test`` records the logical date (here 1999) as the run's start; the
    plugin's listener replaces it by the first task's start and notes the data day."""
    import sqlite3

    root, _, first = embedded
    db = sqlite3.connect(root / "airflow" / "airflow.db")
    start, end, note = db.execute(
        "SELECT d.start_date, d.end_date, n.content FROM dag_run d LEFT JOIN dag_run_note n ON n.dag_run_id = d.id "
        "WHERE d.dag_id = 'privrec_nightly'").fetchone()
    assert note == f"data day {DAY}"
    began, ended = first.wall_clock
    start, end = dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end)
    assert began <= start <= end <= ended, (began, start, end, ended)


def test_rerun_changes_no_output(embedded):
    root, env, _ = embedded
    zones = [lk.path(lk.partition_uri(str(root / "lake"), z, DAY)) for z in ("bronze", "quarantine", "silver")]
    zones.append(lk.path(lk.partition_uri(str(root / "lake"), "dp_stats", DAY)))
    weights = lk.path(lk.partition_uri(str(root / "lake"), "candidates", DAY)) / "model" / "model.safetensors"
    model_before = weights.read_bytes()
    before = [partition_snapshot(z) for z in zones]
    ledger_before = _ledger_rows(root)
    try:
        again = subprocess.run([*RUN, "--keep-engine"], env=env, capture_output=True, text=True, timeout=900)
    finally:
        stopped = subprocess.run([PRIVREC, "engine", "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Spark engine left running: sc://localhost:" in again.stdout
    assert "stopped sc://localhost:" in stopped.stdout
    assert [partition_snapshot(z) for z in zones] == before
    assert _ledger_rows(root) == ledger_before  # the rerun reused the DP releases: nothing spent
    assert weights.read_bytes() == model_before  # and the trained model


def test_a_day_before_the_dags_start_date_is_refused_before_airflow_runs(embedded):
    _, env, _ = embedded
    out = subprocess.run([PRIVREC, "run", "--date", "1969-12-31"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "1969-12-31 is before 1970-01-01, the DAGs' start date" in out.stdout


def test_missing_day_fails_with_a_clear_message_before_airflow_runs(embedded):
    root, env, _ = embedded
    out = subprocess.run([PRIVREC, "run", "--date", "2026-02-01"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "landing partition for 2026-02-01 not found" in out.stdout
    assert not (root / "airflow" / "runs" / "privrec_nightly-2026-02-01.log").exists()  # no DAG run started
