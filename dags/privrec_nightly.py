"""
### privrec nightly

One run = one data interval (a UTC day). The run for day **D** starts after D ends and
processes `landing/interactions/dt=D`:

0. **erasure**: pending right-to-erasure requests (`privrec erase`): each user's rows leave
   landing, bronze, quarantine, silver, training and serving; then **retention** deletes the
   partitions older than each zone's retention (`PRIVREC_RETENTION`).
1. **collect** (Spark): parse with an explicit schema, quarantine malformed records with a
   reason, drop duplicate event ids and records of erased users, encrypt direct identifiers
   (AES-GCM) -> `bronze/`, `quarantine/`, `_manifests/collect/` (landing = bronze +
   quarantined + duplicates + erased).
2. **pseudonymize** (Spark): HMAC-SHA256 pseudonyms, generalized device and network fields,
   scrubbed search text -> `silver/`.
3. **validate** (Spark, Great Expectations): the declared suites on silver and the collect
   manifest -> `reports/quality/dt=D/` (Data Docs + `summary.json`; the task's extra link
   "Quality report" opens it in the Airflow UI through privrec's plugin, XCom `quality_report`
   holds its lake URI). A failed critical expectation
   fails the task, so nothing downstream uses the day; warnings only report. Thresholds are
   the Params below.
4. **dp_stats** (Spark + PyDP): reserves the release's (epsilon, delta) in the privacy
   ledger (fails with PrivacyBudgetExceeded if a user's budget would break), bounds each
   user's contributions, adds noise and selects items privately -> `gold/dp_stats/dt=D/`
   (the DP item vocabulary, funnel, categories, `release.json`, `report.html`, linked as
   "DP statistics report"), then commits the release. A rerun reuses the release and
   spends nothing unless **force_release** is set.
5. **training** (only on the last day of a training window of **train_window_days**):
   `build_partitions` (Spark: disjoint user partitions over the window's DP vocabulary,
   hold-out), `prepare_training` (noise calibrated to **train_epsilon**, reserved in the
   ledger), one `publish_keys` per partition, `seal_keys` (the run's roster of key
   fingerprints; its digest reaches the round tasks through XCom), then per round one task
   per partition in its own queue (user-level DP update, masked for secure aggregation) and one
   aggregation that checks every masked update against the roster; `finish_training` writes the candidate model,
   audits the run (its canaries' empirical epsilon lower bound against the claim) and commits the release. Partitions and rounds: `PRIVREC_TRAIN_PARTITIONS` /
   `PRIVREC_TRAIN_ROUNDS`, the same on every host: each training task first checks that its
   host's shape is the run's (`check_dag_shape`) and fails closed naming both.
6. **evaluate_and_publish**: a candidate whose training audit failed is not published; else DP
   hold-out metrics (a ledger release) against DP popularity and the published model; publishes `models/privrec-recommender/<version>/`
   (outlet Asset `privrec://models/privrec-recommender`) or skips, saying why.

Every task writes only its day's partition, atomically; reruns give the same output.
Every Spark step is a thin client of one warm Spark Connect server (`privrec engine`, started by
the first step that needs it; `PRIVREC_SPARK_REMOTE` for a server run elsewhere); its master
comes from the `spark_default` connection; keys from the `privrec_keys` connection or the
workers' environment. See README.md for configuration.
"""

from __future__ import annotations

import datetime as dt
import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_current_context, task

from privrec_pipeline.config import EARLIEST_DAY

# The Celery queue of partition K's tasks: only the worker holding K's secret listens to it
# (mapped tasks cannot each get a queue, so every partition task is its own unmapped task).
from privrec_pipeline.deployment import partition_queue
from privrec_pipeline.orchestration.local import SPARK_POOL  # bounds the concurrent Spark steps
from privrec_pipeline.orchestration.notify import FailureNotifier
from privrec_pipeline.orchestration.report_operators import DPStatsOperator, QualityValidateOperator
from privrec_pipeline.orchestration.spark_operator import PrivrecSparkOperator

JOBS = Path(__file__).resolve().parents[1] / "jobs"
COMMON_ARGS = ["--date", "{{ ds }}", "--run-id", "{{ run_id }}"]
# Deployment settings (environment, read without I/O at parse time). Federated training topology
# (the DAG's shape depends on it).
PARTITIONS = int(os.environ.get("PRIVREC_TRAIN_PARTITIONS", "2"))
ROUNDS = int(os.environ.get("PRIVREC_TRAIN_ROUNDS", "3"))
MODEL_ASSET = Asset("privrec-recommender", uri="privrec://models/privrec-recommender")
TASK_TIMEOUT = timedelta(minutes=int(os.environ.get("PRIVREC_TASK_TIMEOUT_MINUTES", "180")))


@dag(
    dag_id="privrec_nightly",
    schedule=CronDataIntervalTimetable("30 1 * * *", timezone="UTC"),
    start_date=pendulum.datetime(EARLIEST_DAY.year, EARLIEST_DAY.month, EARLIEST_DAY.day, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    tags=["privrec", "ingest", "privacy"],
    doc_md=__doc__,
    default_args={
        "owner": "privrec",
        # Scheduled runs retry; `privrec run` (a one-shot local run) sets 0 to fail fast.
        "retries": int(os.environ.get("PRIVREC_TASK_RETRIES", "2")),
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "execution_timeout": TASK_TIMEOUT,  # a hung task fails (and retries) instead of holding the day
        "on_failure_callback": FailureNotifier(),
    },
    params={
        "allow_empty": Param(
            False, type="boolean", title="Allow an empty day",
            description="Accept a missing or empty landing partition (a day without traffic) "
                        "instead of failing the run.",
        ),
        "unknown_items": Param(
            "quarantine", type="string", enum=["quarantine", "keep"], title="Events of items outside the catalog",
            description="With an item catalog: quarantine such events (reason unknown_item), or keep them in silver "
                        "(the quality report counts them; the DP statistics leave them out).",
        ),
        "quarantine_rate_max": Param(
            0.05, type="number", minimum=0, maximum=1, title="Largest quarantine rate",
            description="Validation fails the day when collect quarantined a larger share of the "
                        "landing records than this.",
        ),
        "row_count_factor": Param(
            3.0, type="number", minimum=1, title="Row-count tolerance factor",
            description="Validation fails the day when silver's row count is below median / factor or "
                        "above median x factor of the trailing 7 passed days.",
        ),
        "force_release": Param(
            False, type="boolean", title="Force new DP releases",
            description="Release the day's DP statistics (and train the window's model) again even if they "
                        "were released before. A new release draws new noise and spends privacy budget again "
                        "(recorded in the ledger); without this, a rerun reuses the stored releases and spends "
                        "nothing.",
        ),
        "dp_epsilon": Param(
            0.5, type="number", exclusiveMinimum=0, title="Epsilon of the day's DP statistics",
            description="Split across the statistics (see dp_settings.epsilon_split). The ledger refuses "
                        "the release if it would take any user over the budget policy.",
        ),
        "dp_delta": Param(
            1e-8, type="number", exclusiveMinimum=0, maximum=0.001, title="Delta of the day's DP statistics",
            description="Spent by the partition selections of items and categories (none with an item "
                        "catalog: its items and categories are public partitions, and the release has delta 0).",
        ),
        "dp_settings": Param(
            {}, type="object", title="Other DP statistics settings",
            description="Settings of privrec_pipeline/dp_stats/params.py, e.g. "
                        '{"bounds": "fixed", "max_items_per_user": 5, "price_upper": 500, "public_categories": ["books"]} '
                        '(bounds: "auto_if_catalog", the default, chooses K and the category cap privately when '
                        'the day has a catalog).',
        ),
        "train_window_days": Param(
            7, type="integer", minimum=1, title="Training window (days)",
            description="Models are trained on tumbling windows of this many days, on the run of a "
                        "window's last day (other runs skip training), so each day of a user's data is in "
                        "one training release.",
        ),
        "train_vocabulary_size": Param(
            0, type="integer", minimum=0, title="Training vocabulary size",
            description="Train on the N items with the most (DP-released) users of the window; 0 trains on every "
                        "released item: the whole catalog when the lake has one.",
        ),
        "train_epsilon": Param(
            1.0, type="number", exclusiveMinimum=0, title="Epsilon of the model",
            description="User-level (epsilon, delta) of the training release; the noise multiplier is "
                        "calibrated to it with an RDP accountant and the ledger reserves it first.",
        ),
        "train_delta": Param(1e-7, type="number", exclusiveMinimum=0, maximum=0.001, title="Delta of the model",
                             description="Delta of the training release."),
        "train_mode": Param(
            "local", type="string", enum=["local", "distributed"], title="DP mode",
            description="local: every partition's update is DP by itself (full noise per partition); "
                        "distributed: each of P partitions adds N(0, sigma^2 C^2 / (P - t)) and the securely "
                        "aggregated sum is DP while at most t partitions collude with the aggregator; "
                        "train_settings.collusion_tolerance t (default P - 1, every share DP by itself) trades "
                        "noise for trust.",
        ),
        "train_settings": Param(
            {}, type="object", title="Other training settings",
            description="Settings of privrec_pipeline/training/federated.py TrainConfig, e.g. "
                        '{"local_steps": 10, "batch_size": 256, "dim": 64, "clip_norm": 1.0}.',
        ),
        "publish_tolerance": Param(
            0.05, type="number", minimum=0, maximum=1, title="Publish tolerance",
            description="Publish only if the candidate beats DP popularity and its Recall@20 is at most this "
                        "share below the published model's.",
        ),
        "publish_settings": Param(
            {}, type="object", title="Other publish settings",
            description="Settings of privrec_pipeline/models/evaluate.py GateSettings, e.g. "
                        '{"min_gain_over_dp_popularity": 0.05, "resolution": 0.01} '
                        "(-1 as min_gain_over_dp_popularity turns the DP popularity check off; epsilon: of the "
                        "DP evaluation release the gate decides on and the model card shows, unset: chosen from "
                        "the DP population to resolve a Recall@20 gain of resolution at confidence, at most "
                        "max_epsilon).",
        ),
        "quality_settings": Param(
            {}, type="object", title="Other quality settings",
            description="Further settings of privrec_pipeline/quality/config.py, e.g. "
                        '{"price_max": 5000, "severity": {"price.range": "critical"}}.',
        ),
    },
)
def privrec_nightly() -> None:
    collect = _spark_task(PrivrecSparkOperator, "collect", "--allow-empty", "{{ params.allow_empty }}",
                          "--unknown-items", "{{ params.unknown_items }}")
    pseudonymize = _spark_task(PrivrecSparkOperator, "pseudonymize")
    validate = _spark_task(
        QualityValidateOperator, "validate", "--allow-empty", "{{ params.allow_empty }}",
        "--config-json", "{{ params.quality_settings | tojson }}",
        "--set", "quarantine_rate_max={{ params.quarantine_rate_max }}",
        "--set", "row_count_factor={{ params.row_count_factor }}",
    )
    dp_stats = _spark_task(
        DPStatsOperator, "dp_stats", "--dag-id", "{{ dag.dag_id }}", "--force", "{{ params.force_release }}",
        "--epsilon", "{{ params.dp_epsilon }}", "--delta", "{{ params.dp_delta }}",
        "--config-json", "{{ params.dp_settings | tojson }}",
    )
    erasure() >> retention() >> collect >> pseudonymize >> validate >> dp_stats >> _training()


@task
def erasure() -> dict:
    """Pending erasure requests: each user's rows leave every zone before the day is collected
    (``privrec erase``). XCom holds how many requests, never their users' row counts."""
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.erasure.apply import process_pending
    from privrec_pipeline.orchestration.task_keys import task_keyring

    return {"requests_completed": len(process_pending(lake_root(), task_keyring()))}


@task
def retention() -> dict:
    """Expired partitions of the zones holding users' rows are deleted (``PRIVREC_RETENTION``)."""
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.retention import enforce

    report = enforce(lake_root(), _day(get_current_context()))
    return {"removed": report.removed, "kept_uncollected": report.kept_uncollected}


@task.short_circuit
def training_due() -> bool:
    """Skip training (and what follows) unless this run's day closes a training window."""
    from privrec_pipeline.training.tasks import closes_training_window

    context = get_current_context()
    return closes_training_window(_day(context), int(context["params"]["train_window_days"]))


@task
def prepare_training() -> dict:
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import prepare_training as prepare
    from privrec_pipeline.training.tasks import train_config

    context = get_current_context()
    p = context["params"]
    config = train_config({**p["train_settings"], "mode": p["train_mode"], "epsilon": p["train_epsilon"],
                           "delta": p["train_delta"]}, ROUNDS)
    _check_shape(context, prepared=False)
    state = prepare(lake_root(), _day(context), config, run_id=context["run_id"], dag_id=context["dag"].dag_id,
                    force=bool(p["force_release"]))
    return {"release_id": state["release_id"], "status": state["status"], "epsilon": state["plan"]["epsilon"]}


@task
def publish_keys(partition: int) -> dict:
    """The partition's public keys into the lake; their fingerprints (public) into XCom."""
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import publish_keys as publish

    context = get_current_context()
    context["partition"] = partition
    _check_shape(context)
    return publish(lake_root(), _day(context), partition)


@task
def seal_keys(published: list) -> str:
    """The orchestrator's roster of the run (not a partition's task): the keys in the lake must
    be the ones publish_keys reported; the roster's digest goes to the round tasks via XCom."""
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import seal_keys as seal

    context = get_current_context()
    _check_shape(context)
    return seal(lake_root(), _day(context), list(published))


@task
def train_partition(round_index: int, roster_digest: str, partition: int) -> dict:
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import train_partition as train

    context = get_current_context()
    context["partition"] = partition
    _check_shape(context)
    return train(lake_root(), _day(context), round_index, partition, roster_digest)


@task
def aggregate_round(round_index: int, roster_digest: str) -> None:
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import aggregate_round as aggregate

    context = get_current_context()
    _check_shape(context)
    aggregate(lake_root(), _day(context), round_index, roster_digest)


@task
def finish_training() -> dict:
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import finish_training as finish

    context = get_current_context()
    _check_shape(context)
    return finish(lake_root(), _day(context), run_id=context["run_id"])


def _day(context) -> "dt.date":
    return dt.date.fromisoformat(str(context["ds"]))


def _check_shape(context, *, prepared: bool = True) -> None:
    """Every training task first checks that this host's DAG (PARTITIONS x ROUNDS) is the run's."""
    from privrec_pipeline.config import lake_root
    from privrec_pipeline.training.tasks import check_dag_shape

    check_dag_shape(lake_root(), _day(context), PARTITIONS, ROUNDS, prepared=prepared)


def _training():
    """build_partitions, prepare_training, PARTITIONS x publish_keys, seal_keys, then ROUNDS x
    (PARTITIONS partition tasks -> one aggregation), each given the sealed roster's digest
    through XCom (which writers of the lake cannot change). Partition K's tasks run in its own
    queue (``partition_queue``); the orchestrator's tasks in the default one."""
    build = _spark_task(PrivrecSparkOperator, "build_partitions", "--set",
                        "window_days={{ params.train_window_days }}", "--set", f"partitions={PARTITIONS}",
                        "--set", "max_vocabulary={{ params.train_vocabulary_size }}", needs_keys=False)
    partitions = list(range(PARTITIONS))
    due = training_due()
    published = [publish_keys.override(task_id=f"publish_keys_{k}", queue=partition_queue(k))(partition=k)
                 for k in partitions]
    due >> build >> prepare_training() >> published
    roster = seal_keys(published)
    previous = roster
    for r in range(ROUNDS):
        trained = [train_partition.override(task_id=f"train_round_{r}_partition_{k}", queue=partition_queue(k))(
            round_index=r, roster_digest=roster, partition=k) for k in partitions]
        aggregated = aggregate_round.override(task_id=f"aggregate_round_{r}")(round_index=r, roster_digest=roster)
        previous >> trained >> aggregated
        previous = aggregated
    finished = finish_training()
    previous >> finished >> evaluate_and_publish()
    return due


@task(outlets=[MODEL_ASSET])
def evaluate_and_publish() -> dict:
    """Publish the candidate if it beats DP popularity and the published model (within the
    tolerance); otherwise skip, saying why (a skip is not a failure and emits no Asset event)."""
    from airflow.exceptions import AirflowSkipException

    from privrec_pipeline.config import lake_root
    from privrec_pipeline.models.evaluate import gate_settings
    from privrec_pipeline.models.publish import publish

    context = get_current_context()
    params = context["params"]
    gate = gate_settings(float(params["publish_tolerance"]), params["publish_settings"])
    outcome = publish(lake_root(), _day(context), gate=gate, run_id=context["run_id"], dag_id=context["dag"].dag_id,
                      force=bool(params["force_release"]))
    if not outcome["published"]:
        raise AirflowSkipException(f"not published because {outcome['reason']}")
    return {"version": outcome["version"], "path": outcome["path"], "reason": outcome["reason"]}


def _spark_task(operator: type[PrivrecSparkOperator], step: str, *args: str,
                **kwargs: object) -> PrivrecSparkOperator:
    """The task running ``jobs/<step>.py`` for the run's day on the Spark engine (the
    ``spark_default`` connection names its master)."""
    return operator(
        task_id=step,
        application=str(JOBS / f"{step}.py"),
        conn_id="spark_default",
        application_args=[*COMMON_ARGS, *args],
        pool=SPARK_POOL,
        **kwargs,
    )


nightly = privrec_nightly()
