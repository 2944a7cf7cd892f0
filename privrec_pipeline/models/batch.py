"""Batch scoring with the published model (the Asset-scheduled DAG's one call)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from privrec_pipeline import lake as lk
from privrec_pipeline.models.recommend import Recommender, recommend_batch, resolve_version


def score_latest_holdout(lake: str, name: str = "privrec-recommender", k: int = 10) -> dict[str, Any]:
    """Recommendations for the hold-out histories of the latest model's training day."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from privrec_pipeline.training.partitions import training_uri

    folder = resolve_version(lake, name)
    recommender = Recommender.load(folder)
    day = dt.date.fromisoformat(json.loads((folder / "training.json").read_text(encoding="utf-8"))["window"][-1])
    holdout = ds.dataset(str(lk.local_path(training_uri(lake, day)) / "holdout"), format="parquet").to_table()
    frame = holdout.to_pandas()
    frame = frame[frame["role"] == "history"].sort_values(["user_pseudonym", "position"])
    histories = {u: [recommender.items[i] for i in g["item_index"]] for u, g in frame.groupby("user_pseudonym")}
    rows = recommend_batch(recommender, histories, k)
    out = folder / "batch"
    out.mkdir(exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("rank", pa.int32()),
                                                         ("item_id", pa.string()), ("score", pa.float64())]))
    tmp = out / ".recommendations.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / "recommendations.parquet")
    return {"version": folder.name, "users": len(histories), "rows": len(rows)}
