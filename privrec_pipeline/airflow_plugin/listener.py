"""An Airflow listener (loaded by the privrec plugin) that makes the nightly DAG's runs readable
in the UI: each run's note names the data day it processes, and a run started by
``privrec run`` / ``privrec backfill`` (``airflow dags test``) shows its true start.

- The note ("data day D") is written when the scheduler starts a run, and when any run
  finishes (``dags test`` does not announce a start); a note someone wrote in the UI is kept.
- ``airflow dags test`` records the run's logical date as its start date (Airflow's
  ``Dag.test``: ``get_or_create_dagrun(start_date=logical_date or run_after)``), so the demo's
  run, processing 2026-01-15, showed a duration of days. When such a run finishes, its start
  becomes its first task's start. Runs of the scheduler are left as they are.

The hooks change the run object inside the caller's database session (the scheduler's or
``dags test``'s), which commits it with the state change; they never commit themselves. A
failure here is logged by Airflow's listener manager and never fails a run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.listeners import hookimpl

DAGS = frozenset({"privrec_nightly"})
NOTE_PREFIX = "data day "


def data_day(dag_run: Any) -> dt.date | None:
    """The UTC day a nightly run processes: its logical date's (``ds`` in the DAG; ``dags test``
    infers another data interval for the same logical date)."""
    start = dag_run.logical_date or dag_run.data_interval_start
    return None if start is None else start.astimezone(dt.UTC).date()


def annotate(dag_run: Any, *, finished: bool) -> None:
    """Write the note and, for a finished ``dags test`` run, the true start. In the caller's
    session when the run is bound to one (the scheduler), else in a session of its own
    (``dags test`` hands the listener a detached run)."""
    from sqlalchemy.orm import object_session

    if dag_run.dag_id not in DAGS:
        return
    session = object_session(dag_run)
    if session is not None:
        _annotate(dag_run, session, finished)
        return
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as own:
        run = own.get(DagRun, dag_run.id)
        if run is not None:
            _annotate(run, own, finished)
            dag_run.start_date = run.start_date  # the caller may write its copy back


def _annotate(run: Any, session: Any, finished: bool) -> None:
    from airflow.utils.types import DagRunTriggeredByType

    day = data_day(run)
    if day is not None and not run.note:  # a note written in the UI is kept
        run.note = f"{NOTE_PREFIX}{day.isoformat()}"
    if finished and run.triggered_by == DagRunTriggeredByType.TEST:
        starts = [ti.start_date for ti in run.get_task_instances(session=session) if ti.start_date is not None]
        if starts and (run.start_date is None or run.start_date < min(starts)):
            run.start_date = min(starts)


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    annotate(dag_run, finished=False)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    annotate(dag_run, finished=True)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    annotate(dag_run, finished=True)
