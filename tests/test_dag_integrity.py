"""DAG files only wire: they import fast, open no connection, import nothing heavy, and
follow the project's policy (tags, owner, retries >= 2, typed Params, docs)."""

from __future__ import annotations

import itertools
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
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no doc_md"
        assert dag.max_active_runs <= 4
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.retries >= 2, f"{dag_id}.{task.task_id} retries={task.retries}"


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
        assert task._conn_id == "spark_default"  # the connection decides the master
        assert "{{ ds }}" in task.application_args
        assert Path(task.application).is_file()
        # Each job launches with its own JVM options (validate: HotSpot's default for huge methods).
        jvm = "-XX:+DontCompileHugeMethods" if task.task_id == "validate" else "-XX:-DontCompileHugeMethods"
        assert task.conf["spark.driver.extraJavaOptions"] == jvm, task.task_id
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"  # one run per data interval
    # Only collect and pseudonymize read raw identifiers; later steps never receive keys.
    assert [t.needs_keys for t in tasks] == [True, True, False, False]
    # Training: skipped unless the day closes a window; the partitions publish their keys, the
    # orchestrator seals them; P mapped partition tasks per round, then one aggregation; rounds
    # in order; the candidate last.
    chain = ["dp_stats", "training_due", "build_partitions", "prepare_training", "publish_keys", "seal_keys"]
    rounds = sum(t.task_id.startswith("aggregate_round_") for t in dag.tasks)
    assert rounds >= 1
    round_tasks = set()
    for r in range(rounds):
        chain += [f"train_round_{r}", f"aggregate_round_{r}"]
        round_tasks |= {f"train_round_{r}", f"aggregate_round_{r}"}
    chain.append("finish_training")
    for task_id, following in itertools.pairwise(chain):
        # seal_keys hands the roster digest (XCom) to every round task: all of them follow it.
        expected = round_tasks if task_id == "seal_keys" else {following}
        assert dag.get_task(task_id).downstream_task_ids == expected, task_id
    # The roster's digest reaches the partitions and the aggregator through XCom, not the lake;
    # the partitions' own publish_keys results reach seal_keys the same way.
    for r in range(rounds):
        train, aggregate = dag.get_task(f"train_round_{r}"), dag.get_task(f"aggregate_round_{r}")
        assert train.partial_kwargs["op_kwargs"]["roster_digest"].operator.task_id == "seal_keys"
        assert aggregate.op_kwargs["roster_digest"].operator.task_id == "seal_keys"
    assert dag.get_task("seal_keys").op_args[0].operator.task_id == "publish_keys"
    assert not dag.get_task("seal_keys").is_mapped  # one orchestrator task, not a partition's
    assert dag.get_task("build_partitions").needs_keys is False
    mapped = dag.get_task("train_round_0")
    assert mapped.map_index_template == "partition {{ partition }}" and mapped.max_active_tis_per_dag == 2
    dp_args = " ".join(dag.get_task("dp_stats").application_args)
    assert "--force {{ params.force_release }}" in dp_args and "--epsilon {{ params.dp_epsilon }}" in dp_args
