"""DAG files only wire: they import fast, open no connection, import nothing heavy, and
follow the project's policy (tags, owner, retries >= 2, typed Params, docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
HEAVY = ("pyspark", "torch", "great_expectations", "pydp", "pipeline_dp", "opacus", "implicit")

PARSE_PROBE = r"""
import importlib.util, json, socket, sys, time
def refuse(*args, **kwargs):
    raise AssertionError(f"connection opened at parse time: {args!r}")
socket.socket.connect = refuse
socket.create_connection = refuse
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
elapsed = time.perf_counter() - start
from airflow.sdk import DAG
dags = [v for v in vars(module).values() if isinstance(v, DAG)]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"seconds": elapsed, "heavy": heavy, "n_dags": len(dags)}))
"""


def _dag_files() -> list[Path]:
    return sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", _dag_files(), ids=lambda p: p.name)
def test_dag_file_parses_without_connections_or_heavy_imports(path, tmp_path):
    env = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE % (HEAVY,), str(path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"heavy modules imported at parse time: {result['heavy']}"
    assert result["n_dags"] >= 1


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "privrec_nightly" in dagbag.dags


def test_policy_tags_owner_retries_docs(dagbag):
    from privrec_pipeline.orchestration.spark_operator import PrivrecSparkOperator

    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no doc_md"
        assert dag.max_active_runs <= 4
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.retries >= 2, f"{dag_id}.{task.task_id} retries={task.retries}"
            # Operations: a hung task times out; every failure reaches the notifier.
            assert task.execution_timeout is not None and task.execution_timeout.total_seconds() > 0, task.task_id
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert any(type(c).__name__ == "FailureNotifier" for c in callbacks), task.task_id
    spark_tasks = [t for t in dagbag.dags["privrec_nightly"].tasks if isinstance(t, PrivrecSparkOperator)]
    assert len(spark_tasks) == 5 and {t.pool for t in spark_tasks} == {"privrec_spark"}  # bounded sessions


def test_params_are_typed_and_described(dagbag):
    for dag in dagbag.dags.values():
        for name in dag.params:
            param = dag.params.get_param(name)
            assert param.schema.get("type"), f"param {name} has no type"
            assert param.description, f"param {name} has no description"


def test_nightly_wiring(dagbag):
    dag = dagbag.dags["privrec_nightly"]
    steps = ("collect", "pseudonymize", "validate", "dp_stats")
    tasks = [dag.get_task(step) for step in steps]
    for task, following in zip(tasks, steps[1:]):
        assert task.downstream_task_ids == {following}
    for task in tasks:
        assert task.conn_id == "spark_default"  # the connection names the engine's master
        assert "{{ ds }}" in task.application_args
        assert Path(task.application).is_file()
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"  # one run per data interval
    # Only collect and pseudonymize read raw identifiers; later steps never receive keys.
    assert [t.needs_keys for t in tasks] == [True, True, False, False]
    # Training: skipped unless the day closes a window; the partitions publish their keys, the
    # orchestrator seals them; P partition tasks per round, then one aggregation; rounds in
    # order; the candidate last. Every partition task is its own unmapped task in its
    # partition's queue (mapped tasks cannot each get a queue); the orchestrator's tasks are in
    # the default queue.
    partitions = sum(t.task_id.startswith("publish_keys_") for t in dag.tasks)
    rounds = sum(t.task_id.startswith("aggregate_round_") for t in dag.tasks)
    assert partitions >= 2 and rounds >= 1
    publish = {f"publish_keys_{k}" for k in range(partitions)}
    assert dag.get_task("prepare_training").downstream_task_ids == publish
    for task_id in publish:
        assert dag.get_task(task_id).downstream_task_ids == {"seal_keys"}
    round_tasks = {f"aggregate_round_{r}" for r in range(rounds)} | {
        f"train_round_{r}_partition_{k}" for r in range(rounds) for k in range(partitions)}
    assert dag.get_task("seal_keys").downstream_task_ids == round_tasks  # the digest reaches every round task
    previous = "seal_keys"
    for r in range(rounds):
        trained = {f"train_round_{r}_partition_{k}" for k in range(partitions)}
        for task_id in trained:
            assert dag.get_task(task_id).upstream_task_ids == {previous, "seal_keys"}, task_id
            assert dag.get_task(task_id).downstream_task_ids == {f"aggregate_round_{r}"}, task_id
        previous = f"aggregate_round_{r}"
    assert dag.get_task(previous).downstream_task_ids == {"finish_training"}
    for k in range(partitions):
        for task_id in [f"publish_keys_{k}", *(f"train_round_{r}_partition_{k}" for r in range(rounds))]:
            task = dag.get_task(task_id)
            assert task.queue == f"privrec_partition_{k}" and not task.is_mapped, task_id
            assert task.op_kwargs["partition"] == k, task_id
    for task_id in ("seal_keys", "prepare_training", "finish_training", *(f"aggregate_round_{r}" for r in range(rounds))):
        assert not dag.get_task(task_id).queue.startswith("privrec_partition_"), task_id  # holds no secret
    # The roster's digest reaches the partitions and the aggregator through XCom, not the lake;
    # the partitions' own publish_keys results reach seal_keys the same way.
    for r in range(rounds):
        assert dag.get_task(f"train_round_{r}_partition_0").op_kwargs["roster_digest"].operator.task_id == "seal_keys"
        assert dag.get_task(f"aggregate_round_{r}").op_kwargs["roster_digest"].operator.task_id == "seal_keys"
    assert [x.operator.task_id for x in dag.get_task("seal_keys").op_args[0]] == [
        f"publish_keys_{k}" for k in range(partitions)]
    assert dag.get_task("build_partitions").needs_keys is False
    dp_args = " ".join(dag.get_task("dp_stats").application_args)
    assert "--force {{ params.force_release }}" in dp_args and "--epsilon {{ params.dp_epsilon }}" in dp_args
