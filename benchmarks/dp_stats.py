"""DP statistics benchmark: the dp_stats computation against a non-private Spark groupBy of the
same statistics and against PipelineDP's SparkRDDBackend, in one warm SparkSession; plus the
error of the DP item counts on synthetic data and on MovieLens.

- ``groupby``: exact distinct users and counts per item and event type, distinct users per
  event type, events per category, purchase price sum (``bounding.exact_statistics``),
  collected to the driver;
- ``dp_stats``: the same statistics as privrec releases them: contribution bounding in Spark
  SQL, aggregates collected, PyDP partition selection and noise (``bounded_aggregates`` +
  ``add_noise``);
- ``dp_stats job``: ``run_dp_stats`` as the DAG runs it (ledger, release files, report), for
  information;
- ``pipeline_dp``: PipelineDP 0.3 ``DPEngine`` on ``SparkRDDBackend``: COUNT and
  PRIVACY_ID_COUNT per item with the same bounds and private partition selection.

Each of groupby and dp_stats runs ``--repeats`` times, alternating; the table shows the best
(the first run of a query pays the JVM's JIT). Targets: dp_stats <= 2x groupby; PipelineDP
several times slower than dp_stats. Silver comes from the ingest benchmark of the same run
(``bench-out/lake``) when it holds the same day and size, else it is generated and ingested
here first.

Error: for items with at least 100 distinct users (exact, unbounded), the relative error
|noisy users - exact| / exact of the released ones, and the share of them released at all;
it includes the bias of contribution bounding, as a user of the release sees it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ingest import ROOT, machine, write_result

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from rich.console import Console

NAME = "dp_stats"
SECTION = ("<!-- bench:dp_stats:start -->", "<!-- bench:dp_stats:end -->")
TARGET_RATIO = 2.0
MIN_USERS = 100
DEFAULT_MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--repeats", type=int, default=2, help="timed runs of groupby and dp_stats (default: 2)")
    group.add_argument("--movielens", type=Path, default=DEFAULT_MOVIELENS,
                       help="ml-latest-small folder for the error measurement (skipped if absent)")
    group.add_argument("--skip-pipeline-dp", action="store_true", help="leave out the (slow) PipelineDP run")


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


def ensure_silver(spark: "SparkSession", args: argparse.Namespace, lake: str, console: "Console") -> dict[str, Any]:
    """Silver and a passed quality gate for the day: reused from the ingest benchmark when it
    processed the same number of events, else generated and ingested here."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.reporting import load_manifest, load_quality_summary

    collect = load_manifest(lake, "collect", args.date)
    quality = load_quality_summary(lake, args.date)
    if collect and quality and collect["landing_records"] == args.events and quality["gate"] == "passed":
        return {"source": "ingest benchmark of this run or an earlier one", "silver_rows": quality["rows"]}
    from benchmarks.ingest import generate
    from privrec_pipeline.ingest import run_collect, run_pseudonymize
    from privrec_pipeline.quality.config import QualityConfig
    from privrec_pipeline.quality.validate import run_validate
    from privrec_pipeline.secrets import init_key_file, parse_key_document

    console.print(f"no ingested day of {args.events:,} events in {lake}: generating and ingesting it ...")
    key_file, _ = init_key_file(args.out / "keys.json")
    keys = parse_key_document(key_file.read_text(encoding="utf-8"), str(key_file))
    for zone in ("landing", "bronze", "quarantine", "silver", "reports"):
        path = lk.local_path(lk.partition_uri(lake, zone, args.date))
        if path.exists():
            import shutil

            shutil.rmtree(path)
    generate(args, lake)
    run_collect(spark, lake, args.date, keys, run_id="bench")
    run_pseudonymize(spark, lake, args.date, keys, run_id="bench")
    summary = run_validate(spark, lake, args.date, QualityConfig(), run_id="bench")
    return {"source": "generated and ingested by this benchmark", "silver_rows": summary.rows}


def _groupby(silver: "DataFrame") -> int:
    from privrec_pipeline.dp_stats.bounding import exact_statistics

    stats = exact_statistics(silver)
    tables = [stats.items.toArrow(), stats.funnel.toArrow(), stats.categories.toArrow(), stats.purchases.toArrow()]
    return tables[0].num_rows


def _dp(silver: "DataFrame", params: Any, salt: str = "bench") -> Any:
    from privrec_pipeline.dp_stats.bounding import bounded_aggregates, items_per_user_histogram
    from privrec_pipeline.dp_stats.bounds import dropped_contributions
    from privrec_pipeline.dp_stats.noise import add_noise

    aggs = bounded_aggregates(silver, params, salt)
    dropped = None
    if "bounding_bias" in params.plan():
        histogram = items_per_user_histogram(silver, params.bias_cap())
        dropped = dropped_contributions(histogram, params.max_items_per_user, params.bias_cap())
    return add_noise(aggs.items.toArrow(), aggs.funnel.toArrow(), aggs.categories.toArrow(),
                     aggs.purchases.toArrow(), params, dropped=dropped)


def _pipeline_dp(spark: "SparkSession", silver: "DataFrame", params: Any) -> int:
    """PipelineDP: COUNT and PRIVACY_ID_COUNT per item with the same bounds and budget share."""
    import pipeline_dp

    plan = params.plan()
    epsilon = sum(plan[s].epsilon for s in ("item_selection", "item_users", "item_events"))
    accountant = pipeline_dp.NaiveBudgetAccountant(total_epsilon=epsilon, total_delta=plan["item_selection"].delta)
    engine = pipeline_dp.DPEngine(accountant, pipeline_dp.SparkRDDBackend(spark.sparkContext))
    aggregate = pipeline_dp.AggregateParams(
        metrics=[pipeline_dp.Metrics.COUNT, pipeline_dp.Metrics.PRIVACY_ID_COUNT],
        noise_kind=pipeline_dp.NoiseKind.LAPLACE, max_partitions_contributed=params.max_items_per_user,
        max_contributions_per_partition=params.max_events_per_item)
    extractors = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r[0], partition_extractor=lambda r: r[1],
                                            value_extractor=lambda r: 0)
    rows = silver.select("user_pseudonym", "item_id").rdd.map(tuple)
    result = engine.aggregate(rows, aggregate, extractors)
    accountant.compute_budgets()
    return len(result.collect())


def _rel(values: dict[str, float], truth: dict[str, int]) -> tuple[float | None, float | None]:
    errors = sorted(abs(values[i] - n) / n for i, n in truth.items() if i in values)
    if not errors:
        return None, None
    return round(statistics.median(errors), 3), round(errors[math.ceil(0.9 * len(errors)) - 1], 3)


def item_errors(silver: "DataFrame", exact: dict[str, int], params: Any) -> dict[str, Any]:
    """Errors of the noisy distinct users of items with >= MIN_USERS exact users:
    - released: as the release publishes them (selection, then noise), against the exact count;
    - noise only: the same released values against the bounded count (what the noise adds);
    - public catalog: if the item list were public (no selection; the whole item budget on
      the user counts), PyDP Laplace on the bounded counts, against the exact count."""
    from privrec_pipeline.dp_stats.bounding import bounded_aggregates
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    truth = {i: n for i, n in exact.items() if n >= MIN_USERS}
    bounded = {r["item_id"]: r["users"] for r in
               bounded_aggregates(silver, params, "bench").items.select("item_id", "users").collect()}
    release = _dp(silver, params)
    noisy = dict(zip(release.items.column("item_id").to_pylist(), release.items.column("users").to_pylist(),
                     strict=True))
    plan = params.plan()
    catalog_noise = LaplaceNoise(plan["item_selection"].epsilon + plan["item_users"].epsilon,
                                 float(params.max_items_per_user))
    public = {i: max(catalog_noise.count(bounded.get(i, 0)), 0) for i in truth}
    median, p90 = _rel(noisy, truth)
    noise_median, _ = _rel(noisy, {i: bounded[i] for i in truth if bounded.get(i)})
    public_median, public_p90 = _rel(public, truth)
    return {"items_with_100_users": len(truth), "released": sum(i in noisy for i in truth),
            "median_rel_error": median, "p90_rel_error": p90, "noise_only_median": noise_median,
            "public_catalog_median": public_median, "public_catalog_p90": public_p90}


def movielens_silver(spark: "SparkSession", folder: Path) -> "DataFrame":
    """ml-latest-small as one window of silver-shaped rows (every rating an event)."""
    from pyspark.sql import functions as F

    ratings = spark.read.csv(str(folder / "ratings.csv"), header=True, inferSchema=True)
    movies = spark.read.csv(str(folder / "movies.csv"), header=True, inferSchema=True)
    return (ratings.join(movies.select("movieId", F.split("genres", r"\|")[0].alias("category")), "movieId", "left")
            .select(F.concat_ws("-", "userId", "movieId", "timestamp").alias("event_id"),
                    F.sha2(F.concat(F.lit("ml-"), F.col("userId").cast("string")), 256).alias("user_pseudonym"),
                    F.col("movieId").cast("string").alias("item_id"), "category",
                    F.lit("rating").alias("event_type"), F.lit(None).cast("double").alias("price")))


def run(args: argparse.Namespace, console: "Console", command: str) -> int:
    from privrec_pipeline import lake as lk
    from privrec_pipeline.dp_stats.bounding import exact_statistics
    from privrec_pipeline.dp_stats.params import DPStatsParams
    from privrec_pipeline.dp_stats.release import run_dp_stats
    from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    lake = str(out / "lake")
    result: dict[str, Any] = {"benchmark": NAME, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "command": command, "events": args.events, "day": args.date.isoformat(),
                              "machine": machine()}
    spark = _spark()
    result["input"] = ensure_silver(spark, args, lake, console)
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", args.date)).persist()
    silver.count()  # read once: every method below starts from the same in-memory silver
    params = DPStatsParams()
    times: dict[str, list[float]] = {"groupby": [], "dp_stats": []}
    for i in range(args.repeats):
        for name, fn in (("groupby", lambda: _groupby(silver)), ("dp_stats", lambda: _dp(silver, params))):
            seconds, _ = _timed(fn)
            times[name].append(round(seconds, 2))
            console.print(f"{name} run {i + 1}: {seconds:.1f} s")
    ledger = Ledger(f"sqlite:///{out / 'bench-ledger.db'}", BudgetPolicy(epsilon=1e6, delta=0.5))
    job_s, job = _timed(lambda: run_dp_stats(spark, lake, args.date, params, ledger,
                                                     run_id=f"bench-{result['date']}", force=True))
    times["dp_stats job"] = [round(job_s, 2)]
    console.print(f"dp_stats job (ledger, files, report): {job_s:.1f} s, {job.release['released']['items']} items")
    if not args.skip_pipeline_dp:
        console.print("pipeline_dp (SparkRDDBackend) ...")
        seconds, _ = _timed(lambda: _pipeline_dp(spark, silver, params))
        times["pipeline_dp"] = [round(seconds, 2)]
        console.print(f"pipeline_dp: {seconds:.1f} s")
    best = {k: min(v) for k, v in times.items()}
    result["times"], result["best"] = times, best
    result["ratios"] = {"dp_stats / groupby": round(best["dp_stats"] / best["groupby"], 2)}
    if "pipeline_dp" in best:
        result["ratios"]["pipeline_dp / groupby"] = round(best["pipeline_dp"] / best["groupby"], 2)
        result["ratios"]["pipeline_dp / dp_stats"] = round(best["pipeline_dp"] / best["dp_stats"], 2)
    result["meets_target"] = best["dp_stats"] / best["groupby"] <= TARGET_RATIO

    exact = {r["item_id"]: r["users"] for r in exact_statistics(silver).items.select("item_id", "users").collect()}
    errors = []
    for settings in ({}, {"epsilon": 2.0}, {"max_items_per_user": 50}, {"epsilon": 2.0, "max_items_per_user": 50}):
        p = DPStatsParams(**settings)
        errors.append({"data": f"synthetic, 1 day, {args.events:,} events", **_settings(p),
                       **item_errors(silver, exact, p)})
    silver.unpersist()
    if (args.movielens / "ratings.csv").exists():
        ml = movielens_silver(spark, args.movielens).persist()
        ml_exact = {r["item_id"]: r["users"] for r in exact_statistics(ml).items.select("item_id", "users").collect()}
        for settings in ({"epsilon": 1.0, "max_items_per_user": 100}, {"epsilon": 10.0, "max_items_per_user": 100},
                         {"epsilon": 10.0, "max_items_per_user": 300}):
            p = DPStatsParams(**settings)
            errors.append({"data": "MovieLens ml-latest-small, whole set as one window", **_settings(p),
                           **item_errors(ml, ml_exact, p)})
        ml.unpersist()
    else:
        console.print(f"[yellow]{args.movielens}/ratings.csv not found: MovieLens error not measured[/]")
    result["errors"] = errors
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out / "bench-dp-stats.json"
    result["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path)
    write_result(result, json_path, markdown(result), SECTION, console, args.no_markdown)
    return 0


def _settings(p: Any) -> dict[str, Any]:
    return {"epsilon": p.epsilon, "K": p.max_items_per_user, "item_selection_epsilon": round(
        p.plan()["item_selection"].epsilon, 3), "item_users_epsilon": round(p.plan()["item_users"].epsilon, 3)}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown(result: dict[str, Any]) -> str:
    m, best, ratios = result["machine"], result["best"], result["ratios"]
    verdict = "met" if result["meets_target"] else "NOT met"
    lines = [
        SECTION[0],
        "## DP statistics: dp_stats vs a non-private groupBy and PipelineDP",
        "",
        f"- Date: {result['date']}",
        (f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; load average at start "
         f"{m['load_avg_start']}, at end {result['load_avg_end']}; Spark {m['spark']}, Java {m['java']}"),
        f"- Command: `{result['command']}`",
        (f"- Input: silver of one synthetic day, {result['input']['silver_rows']:,} rows "
         f"({result['input']['source']}), persisted in memory; one SparkSession, local[2], driver 4g"),
        "- Default DPStatsParams (epsilon 0.5, delta 1e-8, K 5 items and C 5 events per item per user)",
        "",
        "| method | best s | runs s |",
        "|---|---:|---:|",
        *[f"| {name} | {best[name]:.1f} | {', '.join(f'{t:.1f}' for t in runs)} |"
          for name, runs in result["times"].items()],
        "",
        f"**dp_stats / groupby = {ratios['dp_stats / groupby']:.2f}x (target <= {TARGET_RATIO}: {verdict})**",
    ]
    if "pipeline_dp / groupby" in ratios:
        lines += ["", (f"**PipelineDP / groupby = {ratios['pipeline_dp / groupby']:.1f}x; PipelineDP / dp_stats = "
                       f"{ratios['pipeline_dp / dp_stats']:.1f}x**")]
    lines += [
        "",
        (f"Relative error |noisy - exact| / exact of the distinct users of items with >= {MIN_USERS} users "
         "(exact = unbounded distinct users; includes the bias of contribution bounding), and how many "
         "of those items partition selection released:"),
        "",
        ("| data | epsilon | K | epsilon selection / users | items >= 100 users | released | median | p90 | "
         "noise only, median | public catalog, median | public catalog, p90 |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {e['data']} | {e['epsilon']:g} | {e['K']} | {e['item_selection_epsilon']:g} / "
          f"{e['item_users_epsilon']:g} | {e['items_with_100_users']} | {e['released']} | "
          f"{_pct(e['median_rel_error'])} | {_pct(e['p90_rel_error'])} | {_pct(e['noise_only_median'])} | "
          f"{_pct(e['public_catalog_median'])} | {_pct(e['public_catalog_p90'])} |" for e in result["errors"]],
        "",
        ("\"noise only\" compares the released values with the bounded counts they were computed from; "
         "\"public catalog\" is what the same budget (selection's share moved to the counts) would give if "
         "the item list were public and no selection were needed. The synthetic day has 400 events per "
         "user (5,000 users), so bounding to K items per user removes most of each item's users: the "
         "error against the exact count is mostly that bias. MovieLens has 610 users: no item has enough "
         "users to pass user-level partition selection at these settings."),
        "",
        f"Raw numbers: `{result['json']}`.",
        SECTION[1],
    ]
    return "\n".join(lines)
