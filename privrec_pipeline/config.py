"""Deployment configuration: where the lake is, where the project lives.

One place per layer: environment variables for deployment (this module), Airflow Params
for run knobs (dags/), typed dataclasses inside the library.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout (dags/ and jobs/ live beside the package)."""

DAGS_DIR = PROJECT_ROOT / "dags"
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
