"""Deployment configuration: where the lake is, where the project lives.

One place per layer: environment variables for deployment (this module), Airflow Params
for run knobs (dags/), typed dataclasses inside the library.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout (dags/ and jobs/ live beside the package)."""

DAGS_DIR = PROJECT_ROOT / "dags"
# The DAGs' start date: any day with data since the Unix epoch can run (history of any age:
# MovieLens days from the 1990s, a shop's old logs). Airflow marks a run of a logical date
# before a DAG's start date successful without running a task, so no later start date.
EARLIEST_DAY = dt.date(1970, 1, 1)
JOBS_DIR = PROJECT_ROOT / "jobs"

ENV_LAKE = "PRIVREC_LAKE"
ENV_HOME = "PRIVREC_HOME"


def lake_root() -> str:
    """The lake URI: ``$PRIVREC_LAKE``, else ``./lake`` in the project folder."""
    value = os.environ.get(ENV_LAKE)
    if value:
        return value if "://" in value else str(Path(value).expanduser().resolve())
    return str(PROJECT_ROOT / "lake")


def privrec_home() -> Path:
    """Local state of the embedded default (Airflow home, logs): ``$PRIVREC_HOME`` or ``./.airflow``."""
    value = os.environ.get(ENV_HOME)
    return Path(value).expanduser().resolve() if value else PROJECT_ROOT / ".airflow"


ENV_LEDGER_URL = "PRIVREC_LEDGER_URL"
ENV_DATA_KEYS_URL = "PRIVREC_DATA_KEYS_URL"


def data_keys_url(lake: str | None = None) -> str:
    """Where the users' data keys live (``erasure.data_keys``): ``$PRIVREC_DATA_KEYS_URL``;
    else the ledger's database when ``$PRIVREC_LEDGER_URL`` is set (give the keys a database
    of their own in production: its backups must not outlive an erasure, the ledger's must);
    else a SQLite file ``_ledger/data_keys.db`` beside the local lake's ledger."""
    value = os.environ.get(ENV_DATA_KEYS_URL) or os.environ.get(ENV_LEDGER_URL)
    if value:
        return value
    ledger = ledger_url(lake)
    return ledger.rsplit("/", 1)[0] + "/data_keys.db"


def ledger_url(lake: str | None = None) -> str:
    """The privacy ledger's SQLAlchemy URL: ``$PRIVREC_LEDGER_URL`` (production, e.g.
    ``postgresql+psycopg2://user@host/db``), else a SQLite file ``_ledger/ledger.db`` in a
    local lake (created on first use). A lake on object storage needs the variable."""
    value = os.environ.get(ENV_LEDGER_URL)
    if value:
        return value
    root = lake or lake_root()
    if "://" in root and not root.startswith("file://"):
        from privrec_pipeline.errors import ConfigurationError

        raise ConfigurationError(
            f"the lake {root} is not a local folder: set {ENV_LEDGER_URL} to a database URL for the privacy ledger"
        )
    folder = Path(root.removeprefix("file://")) / "_ledger"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'ledger.db'}"
