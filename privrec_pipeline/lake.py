"""Lake layout (DESIGN.md "Lake layout") and atomic partition replacement on a local lake.

Every zone is partitioned by ``dt=YYYY-MM-DD``. A writer never writes into the visible
partition: it writes a hidden staging folder (leading underscore, ignored by Spark readers)
and swaps it in with renames, so a killed task leaves no half-written partition visible.
The Spark jobs use the same protocol through Hadoop's FileSystem API (``spark_lake``).
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path
from types import TracebackType

ZONES = {
    "landing": "landing/interactions",
    "bronze": "bronze/interactions",
    "quarantine": "quarantine/interactions",
    "silver": "silver/interactions",
    "manifests": "_manifests",
    "reports": "reports/quality",
    "dp_stats": "gold/dp_stats",
    "training": "training",
    "candidates": "models/_candidates",
    "audits": "reports/audits",  # on-demand audits (``audits.py``): public results only
    "catalog": "catalog/items",  # public input: dt=D is the catalog from day D on (catalog.py)
    # Per-user outputs (recommendations keyed by user pseudonym): restricted like silver, never in
    # the published model folder, kept for SERVING_RETENTION_DAYS (models/batch.py).
    "serving": "serving/recommendations",
}


def partition_name(day: dt.date) -> str:
    return f"dt={day.isoformat()}"


def zone_uri(lake: str, zone: str) -> str:
    return f"{lake.rstrip('/')}/{ZONES[zone]}"


def partition_uri(lake: str, zone: str, day: dt.date) -> str:
    return f"{zone_uri(lake, zone)}/{partition_name(day)}"


def manifest_uri(lake: str, step: str, day: dt.date) -> str:
    return f"{zone_uri(lake, 'manifests')}/{step}/{partition_name(day)}.json"


def local_path(uri: str) -> Path:
    """A local lake URI as a path; other schemes are for the Spark jobs only."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"{uri}: this command writes to a local lake only (use a folder or file:// URI)")
    return Path(uri)


def landing_partition(lake: str, day: dt.date) -> Path:
    return local_path(partition_uri(lake, "landing", day))


class LocalPartitionWriter:
    """Context manager yielding a staging folder that replaces ``target`` on success.

    The previous partition (if any) is renamed aside, the staging folder renamed into place,
    then the old one deleted: readers see the old or the new partition, never a mix.
    On error the staging folder is removed and the old partition stays.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        token = uuid.uuid4().hex[:12]
        self.staging = target.parent / f"_staging-{target.name}-{token}"
        self._old = target.parent / f"_replaced-{target.name}-{token}"

    def __enter__(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        if self.target.exists():
            self.target.rename(self._old)
        self.staging.rename(self.target)
        shutil.rmtree(self._old, ignore_errors=True)
