"""Key material for a Python task that needs it (the erasure task): the Airflow connection
``privrec_keys`` (its password is the key document, as the Spark operator gives it to
collect and pseudonymize), else the process's own (``PRIVREC_KEYS_JSON``, ``PRIVREC_KEY_FILE``, the default
file). The document is parsed in the task's process and never returned, logged or pushed."""

from __future__ import annotations

from privrec_pipeline.orchestration.spark_operator import KEYS_CONN_ID
from privrec_pipeline.secrets import KeyRing, load_keyring, parse_key_document


def task_keyring() -> KeyRing:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(KEYS_CONN_ID)
    except AirflowNotFoundException:
        conn = None
    if conn is not None and conn.password:
        return parse_key_document(conn.password, f"connection {KEYS_CONN_ID}")
    return load_keyring()
