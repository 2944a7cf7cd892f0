"""DP statistics benchmark on the demo day: the error of the released item and category counts
against the exact (unbounded) counts, side by side with PipelineDP on the same public
partitions, bounds and budget; and the time of dp_stats against a non-private Spark groupBy.

Input: the demo day (``make demo``'s generator config: ``privrec generate --date 2026-01-15
--events 200000 --users 50000 --items 1000 --bad-rate 0.002``), generated into
``<out>/demo-lake`` and run through collect, pseudonymize and validate here (reused when that
lake already holds it). The generator's catalog is the release's public partitions (items and
categories, ``release.with_catalog``): no partition selection.

- ``groupby``: exact distinct users and counts per item and event type, distinct users per
  event type, events per category, purchase price sum (``bounding.exact_statistics``), collected;
- ``dp_stats``: the release's computation (``release.compute_release``: bounds chosen if
  chosen, bounding in Spark SQL, aggregates collected, PyDP noise), with the catalog;
- ``dp_stats job``: ``run_dp_stats`` as the DAG runs it (ledger, release files, report), for
  information;
- ``pipeline_dp``: PipelineDP 0.3 ``DPEngine`` on ``SparkRDDBackend`` with the catalog as
  ``public_partitions``: PRIVACY_ID_COUNT per item (``max_partitions_contributed`` = our K) and
  COUNT per category (``max_contributions`` = our T, or Kc x Cc with fixed bounds), each at the
  epsilon of our statistic (``item_users``, ``category_events``), delta 0, Laplace.

Errors: |released - exact| / exact, with exact the true unbounded count (distinct users of items
with >= 200 of them; events per category), so the bias of contribution bounding counts; the
released value is the estimate of the unbounded count (``users_estimate``, ``events_estimate``:
the noisy bounded count over the noisy kept share) where the release has one, else the noisy
bounded count (PipelineDP's). Each setting is released ``--draws`` times (bounds chosen again,
noise drawn again); the table shows the median over draws of the median and of the p90 over
items (categories). "bias only" is the estimate without noise (the bounded count over the exact
kept share) against the exact count, "noise only" the released estimate against that.
Targets: item median <= 10%, category median <= 5% at the default epsilon and delta; ours no
worse than PipelineDP's; dp_stats <= 2x groupby.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import ROOT, machine, shown_path, write_result

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from rich.console import Console

NAME = "dp_stats"
SECTION = ("<!-- bench:dp_stats:start -->", "<!-- bench:dp_stats:end -->")
TARGET_RATIO = 2.0
TARGET_ITEMS, TARGET_CATEGORIES = 0.10, 0.05
MIN_USERS = 200
ML_MIN_USERS = 100
DEFAULT_MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"
DEMO = {"date": dt.date(2026, 1, 15), "events": 200_000, "users": 50_000, "items": 1_000, "bad_rate": 0.002}
DEMO_COMMAND = "privrec generate --date 2026-01-15 --events 200000 --users 50000 --items 1000 --bad-rate 0.002"
# (label, DPStatsParams settings): the default first.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default (auto_if_catalog: K, T chosen)", {}),
    ("fixed K 5, Kc x Cc 5 x 10", {"bounds": "fixed"}),
    ("fixed K 25, T 60 (Kc, Cc lifted)",
     {"bounds": "fixed", "max_items_per_user": 25, "max_category_events_per_user": 60,
      "max_categories_per_user": 24, "max_events_per_category": 60}),
    ("auto, 0.9-quantile", {"bounds_quantile": 0.9}),
    ("auto, epsilon 1", {"epsilon": 1.0}),
    ("auto, epsilon 2", {"epsilon": 2.0}),
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--repeats", type=int, default=2, help="timed runs of groupby and dp_stats (default: 2)")
    group.add_argument("--draws", type=int, default=8, help="releases per setting for the error (default: 8)")
    group.add_argument("--movielens", type=Path, default=DEFAULT_MOVIELENS,
                       help="ml-latest-small folder for the error measurement (skipped if absent)")
    group.add_argument("--skip-pipeline-dp", action="store_true", help="leave out the (slow) PipelineDP runs")


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _spark() -> "SparkSession":
    # The DAG's driver memory, on the benchmark's 2-core local master.
    os.environ.setdefault("PYSPARK_SUBMIT_ARGS", "--driver-memory 4g --conf spark.ui.enabled=false pyspark-shell")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers import pipeline_dp from the venv
    from privrec_pipeline.spark.session import get_spark

    return get_spark("privrec-bench-dp-stats", "local[2]")


def ensure_demo_silver(spark: "SparkSession", out: Path, lake: str, console: "Console") -> dict[str, Any]:
    """The demo day's silver and a passed quality gate in ``lake``: reused, else generated and ingested."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.reporting import load_manifest, load_quality_summary

    day = DEMO["date"]
    collect = load_manifest(lake, "collect", day)
    quality = load_quality_summary(lake, day)
    if collect and quality and collect["landing_records"] == DEMO["events"] and quality["gate"] == "passed":
        return {"source": "demo day ingested by an earlier run", "silver_rows": quality["rows"]}
    import shutil

    from privrec_pipeline.ingest import run_collect, run_pseudonymize
    from privrec_pipeline.quality.config import QualityConfig
    from privrec_pipeline.quality.validate import run_validate
    from privrec_pipeline.secrets import init_key_file, parse_key_document
    from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

    console.print(f"generating and ingesting the demo day ({DEMO_COMMAND}) into {lake} ...")
    key_file, _ = init_key_file(out / "keys.json")
    keys = parse_key_document(key_file.read_text(encoding="utf-8"), str(key_file))
    for zone in ("landing", "bronze", "quarantine", "silver", "reports"):
        path = lk.path(lk.partition_uri(lake, zone, day))
        if path.exists():
            shutil.rmtree(path)
    generate_day(GeneratorConfig(date=day, events=DEMO["events"], users=DEMO["users"], items=DEMO["items"],
                                 bad_rate=DEMO["bad_rate"]), lake)
    run_collect(spark, lake, day, keys, run_id="bench")
    run_pseudonymize(spark, lake, day, keys, run_id="bench")
    summary = run_validate(spark, lake, day, QualityConfig(), run_id="bench")
    return {"source": "generated and ingested by this benchmark", "silver_rows": summary.rows}


def _groupby(silver: "DataFrame") -> int:
    from privrec_pipeline.dp_stats.bounding import exact_statistics

    stats = exact_statistics(silver)
    tables = [stats.items.toArrow(), stats.funnel.toArrow(), stats.categories.toArrow(), stats.purchases.toArrow()]
    return tables[0].num_rows


def _rel(values: dict[Any, float], truth: dict[Any, float]) -> tuple[float | None, float | None]:
    errors = sorted(abs(values.get(k, 0) - n) / n for k, n in truth.items() if n)
    if not errors:
        return None, None
    return statistics.median(errors), errors[math.ceil(0.9 * len(errors)) - 1]


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


class Day:
    """One day's silver with its catalog and its exact statistics (the reference)."""

    def __init__(self, silver: "DataFrame", params: Any, catalog_items: Any, public: "DataFrame", min_users: int):
        from privrec_pipeline.dp_stats.bounding import (
            catalog_events,
            exact_statistics,
            items_per_user_histogram,
        )

        self.silver, self.params, self.catalog_items, self.public = silver, params, catalog_items, public
        exact = exact_statistics(catalog_events(silver, public))
        users = {r["item_id"]: r["users"] for r in exact.items.select("item_id", "users").collect()}
        self.item_truth = {i: n for i, n in users.items() if n >= min_users}
        self.category_truth = {r["category"]: r["events"] for r in exact.categories.collect()}
        self.pairs = sum(users.values())  # (user, item) contributions before bounding
        self.histogram = items_per_user_histogram(silver, 10**9, public)
        self.min_users = min_users


def _errors(day: Day, settings: dict[str, Any], draws: int, salt: str) -> tuple[dict[str, Any], list[Any]]:
    """The release's errors at ``settings`` over ``draws`` releases; and the settings each used."""
    from privrec_pipeline.dp_stats.bounding import bounded_aggregates
    from privrec_pipeline.dp_stats.bounds import dropped_contributions
    from privrec_pipeline.dp_stats.release import compute_release

    params = replace(day.params, **settings)
    rows: list[dict[str, Any]] = []
    used: list[Any] = []
    bounded_cache: dict[tuple[int, int | None], tuple[dict, dict]] = {}
    for _ in range(draws):
        p, noisy, _ = compute_release(day.silver, params, salt, day.catalog_items, day.public)
        used.append(p)
        key = (p.max_items_per_user, p.max_category_events_per_user)
        if key not in bounded_cache:
            agg = bounded_aggregates(day.silver, p, salt, catalog=day.public)
            bounded_cache[key] = ({r["item_id"]: r["users"] for r in agg.items.select("item_id", "users").collect()},
                                  {r["category"]: r["events"] for r in agg.categories.collect()})
        b_items, b_cats = bounded_cache[key]
        items, cats = _released(noisy.items, "item_id", "users"), _released(noisy.categories, "category", "events")
        # The estimator without noise: the bounded counts over the exact kept shares.
        item_share = sum(b_items.values()) / day.pairs if noisy.bounding.get("kept_share") else 1.0
        category_share = (sum(b_cats.values()) / sum(day.category_truth.values())
                          if (noisy.bounding.get("category") or {}).get("kept_share") else 1.0)
        b_items = {i: n / item_share for i, n in b_items.items()}
        b_cats = {c: n / category_share for c, n in b_cats.items()}
        i_med, i_p90 = _rel(items, day.item_truth)
        c_med, c_p90 = _rel(cats, day.category_truth)
        rows.append({
            "K": p.max_items_per_user, "T": p.max_category_events_per_user,
            "item_median": i_med, "item_p90": i_p90,
            "item_bias_only": _rel(b_items, day.item_truth)[0],
            "item_noise_only": _rel(items, {i: b_items[i] for i in day.item_truth if b_items.get(i)})[0],
            "category_median": c_med, "category_p90": c_p90,
            "category_bias_only": _rel(b_cats, day.category_truth)[0],
            "category_noise_only": _rel(cats, {c: b_cats[c] for c in day.category_truth if b_cats.get(c)})[0],
            "item_dropped_share": dropped_contributions(day.histogram, p.max_items_per_user, 10**9) / day.pairs,
            "item_dropped_share_dp": noisy.bounding.get("dropped_share"),
            "category_dropped_share": 1 - sum(bounded_cache[key][1].values()) / sum(day.category_truth.values()),
            "item_users_epsilon": p.plan()["item_users"].epsilon,
            "category_events_epsilon": p.plan()["category_events"].epsilon,
        })
    summary = {k: _median([r[k] for r in rows]) for k in rows[0] if k not in ("K", "T")}
    summary["K"] = sorted(r["K"] for r in rows)
    summary["T"] = sorted((r["T"] for r in rows), key=lambda t: -1 if t is None else t)
    summary["draws"] = draws
    summary["per_draw"] = {k: [r[k] for r in rows] for k in (
        "item_median", "category_median", "item_bias_only", "category_bias_only")}
    plan = used[0].plan()  # the noise standard deviation of one count, first draw: sqrt(2) b
    summary["first_draw_noise_std"] = {s: math.sqrt(2) * plan[s].noise_scale for s in ("item_users", "category_events")}
    return summary, used


def _released(table: Any, key: str, count: str) -> dict[Any, float]:
    """key -> the estimate of the unbounded count where the release has one, else the noisy count."""
    rows = table.select([key, count, f"{count}_estimate"]).to_pylist()
    return {r[key]: r[count] if r[f"{count}_estimate"] is None else r[f"{count}_estimate"] for r in rows}


def _pipeline_dp(spark: "SparkSession", day: Day, p: Any, epsilon_factor: float = 1.0,
                 stddev: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """PipelineDP with the catalog as public partitions: item PRIVACY_ID_COUNT at our item_users
    epsilon with l0 = K, category COUNT at our category_events epsilon with our category bound
    (x ``epsilon_factor``: a huge factor leaves its bounding without noise). ``stddev`` gets
    PipelineDP's own noise standard deviation of each (``output_noise_stddev``)."""
    import pipeline_dp

    from privrec_pipeline.dp_stats.bounding import catalog_events

    plan = p.plan()
    rows = catalog_events(day.silver, day.public).select("user_pseudonym", "item_id", "category").rdd.map(tuple)
    out = []
    for epsilon, metric, bounds, key, public in (
            (plan["item_users"].epsilon, pipeline_dp.Metrics.PRIVACY_ID_COUNT,
             {"max_partitions_contributed": p.max_items_per_user, "max_contributions_per_partition": 1}, 1,
             day.catalog_items.column("item_id").to_pylist()),
            (plan["category_events"].epsilon, pipeline_dp.Metrics.COUNT,
             ({"max_contributions": p.max_category_events_per_user} if p.max_category_events_per_user
              and p.max_category_events_per_user < p.max_categories_per_user * p.max_events_per_category else
              {"max_partitions_contributed": p.max_categories_per_user,
               "max_contributions_per_partition": p.max_events_per_category}), 2, list(p.public_categories))):
        accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=epsilon * epsilon_factor, total_delta=0)
        engine = pipeline_dp.DPEngine(accountant, pipeline_dp.SparkRDDBackend(spark.sparkContext))
        params = pipeline_dp.AggregateParams(metrics=[metric], noise_kind=pipeline_dp.NoiseKind.LAPLACE,
                                             output_noise_stddev=True, **bounds)
        extractors = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r[0],
                                                partition_extractor=lambda r, k=key: r[k],
                                                value_extractor=lambda r: 0)
        result = engine.aggregate(rows, params, extractors, public_partitions=public)
        accountant.compute_budgets()
        collected = result.collect()
        if stddev is not None:
            stddev["item_users" if key == 1 else "category_events"] = float(collected[0][1][1])
        out.append({k: (max(round(v[0]), 0) if epsilon_factor == 1.0 else v[0]) for k, v in collected})
    return out[0], out[1]


def _pipeline_dp_errors(spark: "SparkSession", day: Day, used: list[Any], draws: int) -> dict[str, Any]:
    rows, times = [], []
    for p in used[:draws]:
        seconds, (items, cats) = _timed(lambda p=p: _pipeline_dp(spark, day, p))
        times.append(round(seconds, 2))
        i_med, i_p90 = _rel(items, day.item_truth)
        c_med, c_p90 = _rel(cats, day.category_truth)
        rows.append({"item_median": i_med, "item_p90": i_p90, "category_median": c_med, "category_p90": c_p90})
    # The first draw's settings again at 10^6 x the epsilon: PipelineDP's bounding without noise
    # (its bias), and its own noise standard deviation at the real epsilon.
    std: dict[str, float] = {}
    _pipeline_dp(spark, day, used[0], stddev=std)
    items, cats = _pipeline_dp(spark, day, used[0], epsilon_factor=1e6)
    return {**{k: _median([r[k] for r in rows]) for k in rows[0]}, "draws": len(rows), "seconds": times,
            "per_draw": {k: [r[k] for r in rows] for k in ("item_median", "category_median")},
            "first_draw_bias_only": {"item": _rel(items, day.item_truth)[0],
                                     "category": _rel(cats, day.category_truth)[0]},
            "first_draw_noise_std": std}


def _movielens(spark: "SparkSession", folder: Path) -> tuple["DataFrame", Any, "DataFrame"]:
    """ml-latest-small as one window of silver-shaped rows (every rating an event), with its
    movie list as the catalog (public items; the first genre of each movie as its category)."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    ratings = spark.read.csv(str(folder / "ratings.csv"), header=True, inferSchema=True)
    movies = spark.read.csv(str(folder / "movies.csv"), header=True, inferSchema=True).select(
        F.col("movieId").cast("string").alias("item_id"), F.split("genres", r"\|")[0].alias("category"))
    catalog = pa.Table.from_pylist([r.asDict() for r in movies.collect()])
    silver = ratings.select(  # the category comes from the catalog (release.with_catalog does the same)
        F.concat_ws("-", "userId", "movieId", "timestamp").alias("event_id"),
        F.sha2(F.concat(F.lit("ml-"), F.col("userId").cast("string")), 256).alias("user_pseudonym"),
        F.col("movieId").cast("string").alias("item_id"), F.lit(None).cast("string").alias("category"),
        F.lit("rating").alias("event_type"), F.lit(None).cast("double").alias("price"))
    return silver, catalog, spark.createDataFrame(catalog.to_pandas())


def run(args: argparse.Namespace, console: "Console", command: str) -> int:
    from privrec_pipeline import lake as lk
    from privrec_pipeline.dp_stats.params import DPStatsParams
    from privrec_pipeline.dp_stats.release import compute_release, run_dp_stats, with_catalog
    from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    lake = str(out / "demo-lake")
    day = DEMO["date"]
    result: dict[str, Any] = {"benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": command, "demo": {**DEMO, "date": day.isoformat()},
                              "generator_command": DEMO_COMMAND, "machine": machine()}
    spark = _spark()
    result["input"] = ensure_demo_silver(spark, out, lake, console)
    params, snapshot, catalog_items = with_catalog(DPStatsParams(), lake, day)
    assert snapshot is not None, "the demo day has the generator's catalog"
    public = spark.createDataFrame(catalog_items.to_pandas()).persist()
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", day)).persist()
    silver.count()  # read once: every method below starts from the same in-memory silver
    result["catalog"] = {"items": catalog_items.num_rows, "categories": len(params.public_categories)}
    salt = "bench"

    times: dict[str, list[float]] = {"groupby": [], "dp_stats": []}
    for i in range(args.repeats):
        for name, fn in (("groupby", lambda: _groupby(silver)),
                         ("dp_stats", lambda: compute_release(silver, params, salt, catalog_items, public))):
            seconds, _ = _timed(fn)
            times[name].append(round(seconds, 2))
            console.print(f"{name} run {i + 1}: {seconds:.1f} s")
    ledger = Ledger(f"sqlite:///{out / 'bench-ledger.db'}", BudgetPolicy(epsilon=1e6, delta=0.5))
    job_s, job = _timed(lambda: run_dp_stats(spark, lake, day, DPStatsParams(), ledger,
                                             run_id=f"bench-{result['date']}", force=True))
    times["dp_stats job"] = [round(job_s, 2)]
    console.print(f"dp_stats job (ledger, files, report): {job_s:.1f} s, K {job.release['bounds']['max_items_per_user']}")

    demo = Day(silver, params, catalog_items, public, MIN_USERS)
    result["items_with_200_users"] = len(demo.item_truth)
    errors, pipeline = [], []
    for label, settings in SETTINGS:
        console.print(f"errors: {label} ({args.draws} releases) ...")
        summary, used = _errors(demo, settings, args.draws, salt)
        errors.append({"data": "demo day", "setting": label, "epsilon": used[0].epsilon, **summary})
        console.print(f"  items {summary['item_median']}, categories {summary['category_median']}, "
                      f"K {summary['K']}, T {summary['T']}")
        if not args.skip_pipeline_dp and label in (SETTINGS[0][0], SETTINGS[1][0]):
            console.print("  pipeline_dp (SparkRDDBackend, public partitions) ...")
            pdp = _pipeline_dp_errors(spark, demo, used, args.draws)  # the same K, T as each of our draws
            pipeline.append({"setting": label, **pdp})
            console.print(f"  pipeline_dp: items {pdp['item_median']}, categories {pdp['category_median']}, "
                          f"{pdp['seconds']} s")
    if pipeline:
        times["pipeline_dp"] = pipeline[0]["seconds"]
    silver.unpersist()

    if (args.movielens / "ratings.csv").exists():
        ml_silver, ml_catalog, ml_public = _movielens(spark, args.movielens)
        ml_silver = ml_silver.persist()
        ml_params = replace(DPStatsParams(), public_items=True,
                            public_categories=tuple(sorted(set(ml_catalog.column("category").to_pylist()))))
        ml = Day(ml_silver, ml_params, ml_catalog, ml_public, ML_MIN_USERS)
        result["movielens_items_with_100_users"] = len(ml.item_truth)
        for epsilon in (1.0, 10.0):
            console.print(f"errors: MovieLens, epsilon {epsilon:g} ...")
            summary, _ = _errors(ml, {"epsilon": epsilon}, args.draws, salt)
            errors.append({"data": "MovieLens ml-latest-small (one window; movies as catalog)",
                           "setting": f"auto, epsilon {epsilon:g}", "epsilon": epsilon, **summary})
        ml_silver.unpersist()
    else:
        console.print(f"[yellow]{args.movielens}/ratings.csv not found: MovieLens error not measured[/]")

    best = {k: min(v) for k, v in times.items()}
    result["times"], result["best"] = times, best
    result["ratios"] = {"dp_stats / groupby": round(best["dp_stats"] / best["groupby"], 2)}
    if "pipeline_dp" in best:
        result["ratios"]["pipeline_dp / dp_stats"] = round(best["pipeline_dp"] / best["dp_stats"], 2)
    result["meets_target"] = best["dp_stats"] / best["groupby"] <= TARGET_RATIO
    result["errors"], result["pipeline_dp"] = errors, pipeline
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out / "bench-dp-stats.json"
    result["json"] = shown_path(json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ks(values: list[Any]) -> str:
    distinct = sorted(set(values), key=lambda v: -1 if v is None else v)
    return "-" if distinct == [None] else ", ".join("-" if v is None else str(v) for v in distinct)


def _verdict(value: float | None, target: float) -> str:
    return "-" if value is None else ("met" if value <= target else "NOT met")


def why(result: dict[str, Any]) -> str:
    """What the default settings' error is made of, from the rows of this run."""
    rows = {e["setting"]: e for e in result["errors"] if e["data"] == "demo day"}
    d = rows[SETTINGS[0][0]]
    eps_u, eps_c = d["item_users_epsilon"], d["category_events_epsilon"]
    k = statistics.median(d["K"])
    kept = 1 - (d["item_dropped_share"] or 0)
    text = (
        f"Error shares at the default settings (first row): items {_pct(d['item_bias_only'])} bias, "
        f"{_pct(d['item_noise_only'])} noise (item_users gets epsilon {eps_u:.3g} of {d['epsilon']:g}); categories "
        f"{_pct(d['category_bias_only'])} bias, {_pct(d['category_noise_only'])} noise (category_events: epsilon "
        f"{eps_c:.3g}). K is the DP median of the users' distinct items (K = {_ks(d['K'])}); scaled bounds leave "
        f"out {_pct(d['item_dropped_share'])} of the (user, item) contributions, spread over every user's items, "
        "and the estimate divides by the kept share, so what bias remains is how much heavy users' items differ "
        f"from everybody's. The price is noise: an estimate's Laplace scale is K / kept share / epsilon = "
        f"{k:g} / {kept:.2f} / {eps_u:.3g} = {k / kept / eps_u:.0f} users, against a median item with >= "
        f"{MIN_USERS} users of about 310.")
    for label in ("fixed K 25, T 60 (Kc, Cc lifted)", "auto, 0.9-quantile"):
        if label in rows:
            e = rows[label]
            text += (f" {label[0].upper() + label[1:]}: items {_pct(e['item_median'])} (bias "
                     f"{_pct(e['item_bias_only'])}, noise {_pct(e['item_noise_only'])}), categories "
                     f"{_pct(e['category_median'])}.")
    return text + (" PipelineDP truncates each user to K items (sampled) and releases the bounded count: its "
                   "error is the bias of truncation.")


def _movielens_note(result: dict[str, Any]) -> list[str]:
    rows = [e for e in result["errors"] if e["data"].startswith("MovieLens")]
    if not rows:
        return []
    e = rows[-1]
    return [(f"MovieLens (610 users, 9,742 movies as public partitions; {e['setting']}): K = {_ks(e['K'])} (the median "
             f"user's ratings); bounding leaves out {_pct(e['item_dropped_share'])} of the ratings, but the dropped count "
             "clamps each user at B = U = 100 (its sensitivity is B - K), and many MovieLens users have hundreds of "
             f"ratings, so the DP dropped share ({_pct(e['item_dropped_share_dp'])}) understates it and the estimates "
             f"stay biased low (bias only {_pct(e['item_bias_only'])}); with 610 users the noise K / epsilon per movie "
             "is also large against counts of 100-330. A larger `max_items_upper` fixes the clamp at the price of "
             "the dropped count's noise."), ""]


def markdown(result: dict[str, Any]) -> str:
    m, best, ratios = result["machine"], result["best"], result["ratios"]
    default = result["errors"][0]
    pdp = {p["setting"]: p for p in result["pipeline_dp"]}
    lines = [
        SECTION[0],
        "## DP statistics: error on the demo day with the catalog, PipelineDP side by side, time vs a groupBy",
        "",
        f"- Date: {result['date']}",
        (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start "
         f"{m['load_avg_start']}, at end {result['load_avg_end']}; Spark {m['spark']}, Java {m['java']}"),
        f"- Command: `{result['command']}`",
        (f"- Input: the demo day (`{result['generator_command']}`), collected, pseudonymized and validated: "
         f"{result['input']['silver_rows']:,} silver rows ({result['input']['source']}), persisted in memory; "
         f"the generator's catalog ({result['catalog']['items']:,} items, {result['catalog']['categories']} "
         "categories) as public partitions; one SparkSession, local[2], driver 4g"),
        (f"- Error: |noisy - exact| / exact against the exact unbounded count, for the "
         f"{result['items_with_200_users']} items with >= {MIN_USERS} distinct users and for the events of every "
         f"category; median (and p90) over items or categories, then the median over {default['draws']} releases "
         "per setting (bounds chosen and noise drawn each time). Ours: the released estimate of the unbounded "
         "count (noisy bounded count / noisy kept share); PipelineDP: its noisy bounded count. Bias only: our "
         "estimate without noise (bounded count / exact kept share); noise only: the released estimate against "
         "that. Dropped: the share of (user, item) pairs and of category events that bounding left out (exact; "
         "DP estimate of the release in brackets)."),
        "",
        "| data | setting | epsilon | K | T | items: median | p90 | bias only | noise only | "
        "categories: median | p90 | bias only | noise only | dropped: items (DP) | categories |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["errors"]:
        dp_share = "" if e["item_dropped_share_dp"] is None else f" ({_pct(e['item_dropped_share_dp'])})"
        lines.append(
            f"| {e['data']} | {e['setting']} | {e['epsilon']:g} | {_ks(e['K'])} | {_ks(e['T'])} | "
            f"{_pct(e['item_median'])} | {_pct(e['item_p90'])} | {_pct(e['item_bias_only'])} | "
            f"{_pct(e['item_noise_only'])} | {_pct(e['category_median'])} | {_pct(e['category_p90'])} | "
            f"{_pct(e['category_bias_only'])} | {_pct(e['category_noise_only'])} | "
            f"{_pct(e['item_dropped_share'])}{dp_share} | {_pct(e['category_dropped_share'])} |")
        if e["setting"] in pdp:
            p = pdp[e["setting"]]
            lines.append(
                f"| {e['data']} | PipelineDP, same K / T (Kc x Cc), epsilon and public partitions | "
                f"{e['epsilon']:g} | | | {_pct(p['item_median'])} | {_pct(p['item_p90'])} | | | "
                f"{_pct(p['category_median'])} | {_pct(p['category_p90'])} | | | | |")
    lines += [
        "",
        (f"**Default settings (epsilon {default['epsilon']:g}): items median {_pct(default['item_median'])} "
         f"(target <= {TARGET_ITEMS:.0%}: {_verdict(default['item_median'], TARGET_ITEMS)}), categories median "
         f"{_pct(default['category_median'])} (target <= {TARGET_CATEGORIES:.0%}: "
         f"{_verdict(default['category_median'], TARGET_CATEGORIES)})**"),
    ]
    demo_rows = [e for e in result["errors"] if e["data"] == "demo day"]
    meets = {what: [e["setting"] for e in demo_rows if e[key] is not None and e[key] <= target]
             for what, key, target in (("item", "item_median", TARGET_ITEMS),
                                       ("category", "category_median", TARGET_CATEGORIES))}
    lines += ["", "Settings of the table that meet the item target: "
              + ("; ".join(meets["item"]) or "none") + ". The category target: "
              + ("; ".join(meets["category"]) or "none") + "."]
    lines += ["", why(result)]
    if default["setting"] in pdp:
        p = pdp[default["setting"]]
        # Ours no worse: the median error over the same draws (each at the K and T of one of ours)
        # no larger, for items and for categories.
        no_worse = all(default[k] is not None and p[k] is not None and default[k] <= p[k]
                       for k in ("item_median", "category_median"))
        pdp_bias = p["first_draw_bias_only"]
        lines += ["", (f"**PipelineDP at the same settings: items {_pct(p['item_median'])}, categories "
                       f"{_pct(p['category_median'])} ({p['draws']} releases, each with the K and T of one "
                       f"of ours); ours {_pct(default['item_median'])} and {_pct(default['category_median'])}. "
                       f"Ours no worse: {'met' if no_worse else 'NOT met'}**. PipelineDP at the first draw's bounds "
                       f"without noise (its bias): items {_pct(pdp_bias['item'])}, categories "
                       f"{_pct(pdp_bias['category'])}; its noise standard deviation of one bounded count: items "
                       f"{p['first_draw_noise_std']['item_users']:.1f}, categories "
                       f"{p['first_draw_noise_std']['category_events']:.1f} (ours, of the bounded count: "
                       f"{default['first_draw_noise_std']['item_users']:.1f} and "
                       f"{default['first_draw_noise_std']['category_events']:.1f}; the estimate multiplies it by "
                       "1 / kept share).")]
        ours = default["per_draw"]
        lines += ["", "Draw by draw (ours / PipelineDP): items " + ", ".join(
            f"{_pct(a)} / {_pct(b)}" for a, b in zip(ours["item_median"], p["per_draw"]["item_median"]))
            + "; categories " + ", ".join(
            f"{_pct(a)} / {_pct(b)}" for a, b in zip(ours["category_median"], p["per_draw"]["category_median"]))
            + " (one noise draw each: a draw's median moves by a few points from draw to draw)."]
    lines += [
        "",
        "| method | best s | runs s |",
        "|---|---:|---:|",
        *[f"| {name} | {best[name]:.1f} | {', '.join(f'{t:.1f}' for t in runs)} |"
          for name, runs in result["times"].items()],
        "",
        (f"**dp_stats / groupby = {ratios['dp_stats / groupby']:.2f}x (target <= {TARGET_RATIO}: "
         f"{'met' if result['meets_target'] else 'NOT met'})**"
         + (f"; PipelineDP (item and category aggregations, SparkRDDBackend) / dp_stats (the whole release) = "
            f"{ratios['pipeline_dp / dp_stats']:.1f}x" if "pipeline_dp / dp_stats" in ratios else "")),
        "",
        ("dp_stats here is `release.compute_release` with the default settings (K and T chosen, the two "
         "histograms they need, bounding, every statistic's noise); groupby computes the same statistics "
         "exactly; dp_stats job adds the ledger, the files and the report page. Both run four Spark jobs; "
         "dp_stats' jobs each have a per-user window or two shuffles (the per-user summary behind K, T, the "
         "bias count and the funnel; the bounded items; the bounded categories; the purchases), and on a "
         "200,000-event day these fixed costs weigh more than on the 2,000,000-event day of the earlier "
         "selection-path measurement (1.46x). PipelineDP's time is its two aggregations only."),
        "",
        *_movielens_note(result),
        f"Raw numbers: `{result['json']}`.",
        SECTION[1],
    ]
    return "\n".join(lines)
