"""Batch scoring with the published model (the Asset-scheduled DAG's one call).

The output is per user (top-k items per user pseudonym), so it is restricted data, not part of
the published model: it goes to the ``serving`` zone (``serving/recommendations/dt=D/``, D the
model's training day; one file per model version), readable by the serving system only, and
partitions older than ``PRIVREC_SERVING_RETENTION_DAYS`` (default 30) days before the newest
one are deleted by each run. What the task returns (XCom) holds no count of users.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from privrec_pipeline import lake as lk
from privrec_pipeline.erasure import lake_lock
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.models.recommend import Recommender, recommend_batch, resolve_version

RETENTION_ENV = "PRIVREC_SERVING_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 30


def retention_days(environ: dict[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(RETENTION_ENV, str(DEFAULT_RETENTION_DAYS))
    try:
        days = int(raw)
    except ValueError:
        days = -1
    if days < 1:
        raise ConfigurationError(f"{RETENTION_ENV} must be a positive number of days, not {raw!r}")
    return days


def prune_serving(lake: str, newest: dt.date, keep_days: int) -> list[str]:
    """Delete serving partitions of days more than ``keep_days`` before ``newest``; their names."""
    root = lk.path(lk.zone_uri(lake, "serving"))
    removed = []
    for folder in sorted(root.glob("dt=*")) if root.exists() else []:
        try:
            day = dt.date.fromisoformat(folder.name.removeprefix("dt="))
        except ValueError:
            continue  # not a partition of this zone: left alone
        if (newest - day).days > keep_days:
            lk.remove(folder)
            removed.append(folder.name)
    return removed


@lake_lock.step("batch scoring")
def score_latest_holdout(lake: str, name: str = "privrec-recommender", k: int = 10) -> dict[str, Any]:
    """Recommendations for the hold-out histories of the latest model's training day, into the
    serving zone; returns where they are (and nothing counted from the data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from privrec_pipeline.training.partitions import training_uri

    keep = retention_days()
    folder = resolve_version(lake, name)
    recommender = Recommender.load(folder)
    day = dt.date.fromisoformat(lk.read_json(folder / "training.json")["window"][-1])
    holdout = lk.dataset(lk.path(training_uri(lake, day)) / "holdout", format="parquet").to_table()
    frame = holdout.to_pandas()
    frame = frame[frame["role"] == "history"].sort_values(["user_pseudonym", "position"])
    histories = {u: [recommender.items[i] for i in g["item_index"]] for u, g in frame.groupby("user_pseudonym")}
    rows = recommend_batch(recommender, histories, k)
    out = lk.path(lk.partition_uri(lake, "serving", day))
    out.mkdir(parents=True, exist_ok=True, mode=0o750)
    table = pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("rank", pa.int32()),
                                                         ("item_id", pa.string()), ("score", pa.float64())]))
    target = out / f"{folder.name}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    lk.write_bytes(target, buffer.getvalue().to_pybytes(), mode=0o640)
    removed = prune_serving(lake, day, keep)
    return {"version": folder.name, "path": str(target), "retention_days": keep, "pruned": removed}
