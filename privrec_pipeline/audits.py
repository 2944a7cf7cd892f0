"""On-demand audits of a day's releases (``privrec audit``), written to ``reports/audits/dt=D/``.

- ``training``: the day's training run repeated in this process (its config, its DP partition
  counts, its shards) with ``canaries`` canaries, and the one-run audit of it
  (``training.canaries``). The canary block depends on no user's data, so the result is
  public; ``noise=False`` runs the same mechanism with its noise turned off, which a working
  audit must refute (the audit's power, for the benchmark and for an operator's check).
- ``dp_stats``: the DP statistics tester (``dp_stats.audit``) on the day's release *as
  configured* (its epsilon split, its chosen K and T, its catalog keys or partition
  selection) run on synthetic neighbouring days: a base day and the base plus one user
  whose contribution exceeds every bound. Synthetic days keep the result free of any user's
  data (the tester's thresholds are quantiles of the outputs, which on real days would
  reveal exact counts), so it can go into the DP report.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

TRAINING_FILE, DP_STATS_FILE = "training.json", "dp_stats.json"


def audit_folder(lake: str, day: dt.date) -> "lk.UPath":
    return lk.path(lk.partition_uri(lake, "audits", day))


def _write(lake: str, day: dt.date, name: str, doc: dict[str, Any]) -> "lk.UPath":
    lk.write_json(audit_folder(lake, day) / name, doc)
    return audit_folder(lake, day) / name


def audit_training(lake: str, day: dt.date, *, canaries: int = 2000, noise: bool = True,
                   confidence: float = 0.99) -> dict[str, Any]:
    """Repeat the day's training run with ``canaries`` canaries and audit it (see the module)."""
    from privrec_pipeline.training.federated import PrivacyPlan, TrainConfig, train_in_process
    from privrec_pipeline.training.tasks import (
        item_category,
        load_shard,
        run_folder,
        training_folder,
    )

    plan_file = run_folder(lake, day) / "plan.json"
    if not plan_file.exists():
        raise PrivrecError(f"no training run for {day} ({plan_file}): the audit repeats a planned run; run the "
                           "day's training first (a day that closes a training window)")
    doc = lk.read_json(plan_file)
    config = replace(TrainConfig(**doc["config"]), audit_canaries=canaries, audit_confidence=confidence)
    plan = PrivacyPlan(**doc["plan"])
    if not noise:
        plan = replace(plan, noise_std_per_partition=0.0)
    shards = [load_shard(training_folder(lake, day) / f"partition={k}") for k in range(doc["partitions"])]
    started = time.perf_counter()
    result = train_in_process(config, shards, doc["vocabulary_size"], run_id=f"audit-{doc['run_id']}",
                              secure=len(shards) >= 2, plan=plan,
                              item_category=item_category(lake, day, doc["vocabulary_size"]))
    out = {**result.audit.to_dict(), "noise": noise, "training_release": doc["release_id"], "mode": plan.mode,
           "seconds": round(time.perf_counter() - started, 1), "kind": "training",
           "what": "the day's training run repeated with canaries (its config, DP partition counts and shards)"}
    out["path"] = str(_write(lake, day, TRAINING_FILE, out))
    return out


def _synthetic_days(spark: "SparkSession", items: list[str], categories: list[str], params: Any):
    """A base day (40 users, 3 events each) and its neighbour: the base plus one user with more
    distinct items than K, more category events than the category bound, purchases above the
    price clamp."""
    from privrec_pipeline.schema import EVENT_TYPES

    columns = ["event_id", "user_pseudonym", "item_id", "category", "event_type", "price"]
    category = {item: categories[i % len(categories)] for i, item in enumerate(items)} if categories else {}

    def event(e: str, user: str, item: str, kind: str, price: float) -> tuple:
        return (e, user, item, category.get(item, "c"), kind, price)

    base = [event(f"e-{u}-{j}", f"{u:064x}", items[(u + j) % min(len(items), 20)], EVENT_TYPES[j % len(EVENT_TYPES)],
                  10.0) for u in range(40) for j in range(3)]
    heavy_items = max(params.max_items_per_user, params.category_l1()) * 2
    heavy = [event(f"h-{i}", "f" * 64, items[(20 + i) % len(items)], "purchase" if i % 2 else "view",
                   params.price_upper * 2) for i in range(heavy_items)]
    frame = spark.createDataFrame(base, columns)
    return frame, frame.unionByName(spark.createDataFrame(heavy, columns))


def audit_dp_stats(spark: "SparkSession", lake: str, day: dt.date, *, runs: int = 1500,
                   confidence: float = 0.999) -> dict[str, Any]:
    """The DP statistics tester on the day's release configuration (see the module)."""
    from privrec_pipeline.catalog import read_items, snapshot_for
    from privrec_pipeline.dp_stats.audit import audit_release
    from privrec_pipeline.dp_stats.params import DPStatsParams
    from privrec_pipeline.dp_stats.release import RELEASE_FILE, dp_stats_uri
    from privrec_pipeline.settings import from_settings

    release_file = lk.path(dp_stats_uri(lake, day)) / RELEASE_FILE
    release = lk.read_json_if_exists(release_file)
    if release is None:
        raise PrivrecError(f"no DP statistics release for {day} ({release_file}): run the day first")
    # The release's settings as built: K and T as chosen, fixed (their choice is its own
    # statistic, ``tests/test_dp_tester.py``), each statistic at the epsilon it was released with.
    built = from_settings(DPStatsParams, release["params"], "dp_stats setting")
    params = replace(built, bounds="fixed",
                     epsilon=built.epsilon * (1 - built.bounds_epsilon_share * len(built.bound_choices())))
    catalog_items, public = None, None
    if (release.get("keys") or {}).get("catalog"):
        snapshot = snapshot_for(lake, day)
        if snapshot is None:
            raise PrivrecError(f"the release of {day} used a catalog that is no longer in the lake")
        catalog_items = read_items(snapshot).select(["item_id", "category"])
        public = spark.createDataFrame(catalog_items.to_pandas())
        items = catalog_items.column("item_id").to_pylist()
    else:
        items = [f"audit-item-{i}" for i in range(60)]
    base, neighbour = _synthetic_days(spark, items, list(params.public_categories), params)
    started = time.perf_counter()
    bounds = audit_release(base, neighbour, params, runs, salt=f"audit-{day.isoformat()}",
                           catalog_items=catalog_items, public=public, confidence=confidence)
    out = {"kind": "dp_stats", "release_id": release["release_id"], "runs": runs, "confidence": confidence,
           "seconds": round(time.perf_counter() - started, 1),
           "what": "the release's mechanisms as configured, on synthetic neighbouring days (one user added "
                   "whose contribution exceeds every bound)",
           "statistics": {name: b.to_dict() for name, b in bounds.items()},
           "passed": not any(b.refutes for b in bounds.values())}
    out["path"] = str(_write(lake, day, DP_STATS_FILE, out))
    _render_dp_report(lake, day, release, out)
    return out


def _render_dp_report(lake: str, day: dt.date, release: dict[str, Any], audit: dict[str, Any]) -> None:
    """The day's DP statistics report again, with its audit section."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from privrec_pipeline.dp_stats.release import REPORT_FILE, dp_stats_uri
    from privrec_pipeline.dp_stats.report import render_release_page

    folder = lk.path(dp_stats_uri(lake, day))
    tables = {name: pq.read_table(pa.BufferReader((folder / f"{name}.parquet").read_bytes())).to_pylist()
              for name in ("items", "funnel", "categories")}
    page = render_release_page(release, tables["items"], tables["funnel"], tables["categories"], audit=audit)
    lk.write_text(folder / REPORT_FILE, page)


def read_audit(lake: str, day: dt.date, name: str) -> dict[str, Any] | None:
    return lk.read_json_if_exists(audit_folder(lake, day) / name)
