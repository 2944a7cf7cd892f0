"""The dp_stats step: one accounted, idempotent DP release of a day's statistics.

    reserve in the ledger -> read silver -> bound (Spark SQL) -> noise + selection (PyDP)
    -> write gold/dp_stats/dt=D/ atomically -> commit in the ledger

- The day must have passed the quality gate (its ``summary.json`` says so) before anything
  is reserved; a release that would break the budget fails in ``reserve``, before any data
  is read.
- Noise is drawn once per release. A retried task or a later run of the same day gets the
  release from the ledger (``resume``/``reuse``); if the partition already holds that
  release, it is returned as it is, without reading silver. ``force`` makes a new release,
  which the ledger counts again.
- The reservation's description (settings, sensitivities, noise scales, pseudonym key
  fingerprint) must match for a resume: a run with other Params cannot continue a release
  reserved at other numbers (``ReleaseMismatch``).
- One run computes a release: the run holding its lease (``ReleaseInProgress`` for the
  others while it lasts). The partition is swapped in under the ledger lock, as part of the
  commit, and only while this run holds the lease.
- If the step fails before its partition is swapped in, the lease holder marks the
  reservation failed (nothing was released, so nothing is spent). A failure after the swap
  leaves it reserved: the retry (or a run taking the expired lease over) finds the partition
  and commits it without drawing noise again.

Output partition: ``items.parquet`` (the DP item vocabulary with noisy counts),
``funnel.parquet``, ``categories.parquet``, ``release.json`` (what was computed with which
noise: the planned numbers the ledger accounted and, under ``as_built``, PyDP's own
description of each mechanism, checked against them) and ``report.html``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import tempfile
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from privrec_pipeline import lake as lk
from privrec_pipeline.catalog import CatalogSnapshot, read_items, snapshot_for
from privrec_pipeline.dp_stats.bounding import UserSummary, bounded_aggregates, user_summary
from privrec_pipeline.dp_stats.bounds import ChosenBound, choose_quantile, dropped_contributions
from privrec_pipeline.dp_stats.noise import NoisyRelease, add_noise
from privrec_pipeline.dp_stats.params import (
    CATEGORY_BOUNDS,
    DEPENDS_ON_K,
    DEPENDS_ON_T,
    ITEM_BOUNDS,
    DPStatsParams,
    StatisticBudget,
)
from privrec_pipeline.dp_stats.report import render_release_page
from privrec_pipeline.errors import ConfigurationError, LeaseLost, PrivrecError, QualityGateFailed
from privrec_pipeline.manifest import pseudonym_fingerprint
from privrec_pipeline.privacy.accounting import basic_composition, composed_epsilon
from privrec_pipeline.privacy.ledger import Ledger, Release
from privrec_pipeline.quality.validate import SUMMARY_FILE, report_uri
from privrec_pipeline.schema import EVENT_TYPES

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
RELEASE_KEY = "dp_stats"
RELEASE_FILE = "release.json"
REPORT_FILE = "report.html"
TABLES = ("items", "funnel", "categories")


@dataclass(frozen=True)
class DPStatsResult:
    status: str  # "new" (computed now), "resume" (an open reservation finished now), "reuse" (already released)
    uri: str
    release: dict[str, Any]  # the content of release.json


def dp_stats_uri(lake: str, day: dt.date) -> str:
    return lk.partition_uri(lake, "dp_stats", day)


def _read_json(fs: lk.Lake, uri: str, release_id: int | None = None) -> dict[str, Any] | None:
    """The JSON document at ``uri`` (with ``release_id``: only if it belongs to that release)."""
    doc = json.loads(fs.read_text(uri)) if fs.exists(uri) else None
    return None if doc is None or (release_id is not None and doc.get("release_id") != release_id) else doc


def release_parameters(params: DPStatsParams, pseudonym_key_fingerprint: str,
                       catalog: CatalogSnapshot | None = None) -> dict[str, Any]:
    """What decides the release's noise beyond its mechanisms: the settings, each statistic's
    sensitivity and noise scale, the pseudonym key (one user = one pseudonym only under one
    key) and the catalog whose items are the public keys. A resumed reservation must present
    exactly these. With chosen bounds K (and T) are chosen after the reservation, from the data:
    the sensitivities and noise scales that depend on them are described as "auto" (the ledger's
    components, noise multipliers 1 / epsilon_i, do not depend on K or T)."""
    choices = params.bound_choices()
    chosen = ((DEPENDS_ON_K if ITEM_BOUNDS in choices else ())
              + (DEPENDS_ON_T if CATEGORY_BOUNDS in choices else ()))

    def k_dependent(name: str, value: Any) -> Any:
        return "auto" if name in chosen and value is not None else value

    described = {"settings": params.to_dict(), "pseudonym_key_fingerprint": pseudonym_key_fingerprint,
                 "statistics": {name: {"mechanism": b.mechanism, "epsilon": b.epsilon, "delta": b.delta,
                                       "sensitivity": k_dependent(name, b.sensitivity),
                                       "noise_scale": k_dependent(name, b.noise_scale)}
                                for name, b in params.plan().items()}}
    if catalog is not None:
        described["catalog"] = {"day": catalog.day.isoformat(), "sha256": catalog.sha256, "items": catalog.items}
    return described


def with_catalog(params: DPStatsParams, lake: str, day: dt.date) -> tuple[DPStatsParams, CatalogSnapshot | None,
                                                                          "pa.Table | None"]:
    """The release's settings with the day's catalog as public keys (items and categories), the
    snapshot and its items; without a catalog (or with ``use_catalog`` off) they are unchanged
    and keys go through partition selection."""
    if params.public_items:
        raise ConfigurationError("DPStatsParams: public_items is set from the catalog, not by hand "
                                 "(load a catalog with privrec catalog load, or use public_categories)")
    snapshot = snapshot_for(lake, day) if params.use_catalog else None
    if snapshot is None:
        return params, None, None
    items = read_items(snapshot).select(["item_id", "category"])
    categories = tuple(sorted(set(items.column("category").to_pylist())))
    return replace(params, public_items=True, public_categories=categories), snapshot, items


def require_quality_gate(fs: lk.Lake, lake: str, day: dt.date) -> None:
    """DP statistics use a day only after validation passed it."""
    uri = f"{report_uri(lake, day)}/{SUMMARY_FILE}"
    summary = _read_json(fs, uri)
    if summary is None:
        raise QualityGateFailed(f"no quality summary for {day} ({uri}): run the validate step for this date first")
    if summary.get("gate") != "passed":
        failed = ", ".join(summary.get("failed_critical", [])) or "unknown"
        raise QualityGateFailed(f"the quality gate of {day} failed ({failed}): no DP statistics for this day")


def run_dp_stats(spark: "SparkSession", lake: str, day: dt.date, params: DPStatsParams, ledger: Ledger, *,
                 run_id: str = "manual", dag_id: str = "manual", force: bool = False) -> DPStatsResult:
    fs = lk.Lake(lake)
    require_quality_gate(fs, lake, day)
    params, catalog, catalog_items = with_catalog(params, lake, day)
    if params.bounds == "auto" and not params.public_items:
        # The score weighs the noise of every item count: without public items, how many
        # items there are is itself private (and partition selection's threshold moves with K).
        raise ConfigurationError("DPStatsParams: bounds 'auto' needs the day's catalog (public items; load one with "
                                 "privrec catalog load and keep use_catalog on), or set max_items_per_user by hand "
                                 "(bounds 'fixed')")
    epsilon, delta = params.spent()
    reservation = ledger.reserve(RELEASE_KEY, day, day, params.components(), epsilon=epsilon, delta=delta,
                                 dag_id=dag_id, run_id=run_id, force=force,
                                 parameters=release_parameters(params, pseudonym_fingerprint(fs, lake, day), catalog))
    release = reservation.release
    target = dp_stats_uri(lake, day)
    existing = _read_json(fs, f"{target}/{RELEASE_FILE}")
    if existing is not None and existing.get("release_id") == release.id:
        if reservation.status != "reuse":  # written by an attempt that stopped before committing
            ledger.commit(release.id, {"uri": target}, run_id=run_id)
        log.info("release %s of %s is already in %s: reused, nothing spent", release.id, day, target)
        return DPStatsResult("reuse", target, existing)
    if reservation.status == "reuse":
        raise PrivrecError(
            f"release {release.id} (dp_stats of {day}) is committed in the ledger, but {target} does not hold it "
            f"(found {'release ' + str(existing.get('release_id')) if existing else 'nothing'}); its noise cannot be "
            "drawn again for free: restore the partition, or rerun with force to make (and pay for) a new release"
        )
    try:
        doc = _compute(spark, lake, day, params, release, ledger, catalog, catalog_items)
        noisy: NoisyRelease = doc.pop("_tables")
        stage = fs.staging_uri(target)
        with tempfile.TemporaryDirectory(prefix="privrec-dp-stats-") as tmp:
            _write_local(tmp, doc, noisy)
            try:
                fs.upload_dir(tmp, stage, last=RELEASE_FILE)
                # The swap runs under the ledger lock and only while this run holds the lease:
                # a run whose reservation was taken over never publishes its noise.
                ledger.commit(release.id, {"uri": target, "items": doc["released"]["items"]}, run_id=run_id,
                              publish=lambda: fs.swap_in(stage, target, last=RELEASE_FILE))
            except BaseException:
                fs.delete(stage)
                raise
    except LeaseLost:
        raise  # the release belongs to another run now: neither publish nor fail it
    except BaseException as exc:
        if _read_json(fs, f"{target}/{RELEASE_FILE}", release.id) is None:
            # Nothing of this release is in place: the reservation is returned. (Killed after
            # the swap and before the commit, the retry finds the partition and commits it.)
            try:
                ledger.fail(release.id, f"{type(exc).__name__} before the release was written", run_id=run_id)
            except PrivrecError as not_failed:  # e.g. held by another run now: the original error stands
                log.warning("release %s not marked failed: %s", release.id, not_failed)
        raise
    log.info("released dp_stats of %s (release %s, epsilon %.4g, delta %.2g, K %d %s): %d items -> %s",
             day, release.id, epsilon, delta, doc["bounds"]["max_items_per_user"], doc["bounds"]["chosen"],
             doc["released"]["items"], target)
    return DPStatsResult(reservation.status, target, doc)


def compute_release(silver: "DataFrame", params: DPStatsParams, salt: str,
                    catalog_items: "pa.Table | None" = None, public: "DataFrame | None" = None,
                    ) -> tuple[DPStatsParams, NoisyRelease, dict[str, ChosenBound]]:
    """Choose the bounds (if chosen), bound, aggregate and add noise: the release's numbers, the
    settings they were computed with (the chosen K and T in them) and the choices made.
    ``catalog_items`` (item_id, category) with ``public`` (the same as a DataFrame): the catalog."""
    reserved = params.components()
    choices: dict[str, ChosenBound] = {}
    plan = params.plan()
    # Distinct items and category events per user (clamped), and the funnel, in one job: the
    # histograms are never released; the exponential mechanisms choosing K and T use them, and
    # the dropped count of the bounding_bias statistic.
    summary = user_summary(silver, params, max(params.max_items_upper, params.max_items_per_user) + 1,
                           max(params.max_category_events_upper, params.category_l1()) + 1, public)
    # Not logged here: a draw of an attempt that fails before its release is published must
    # leave no trace (logs are outputs); the committed release.json records the bounds it used.
    if ITEM_BOUNDS in plan:
        choices[ITEM_BOUNDS] = choose_quantile(summary.items, params.bounds_quantile, plan[ITEM_BOUNDS].epsilon,
                                               params.max_items_upper)
        params = replace(params, max_items_per_user=choices[ITEM_BOUNDS].k)
    if CATEGORY_BOUNDS in plan:
        choices[CATEGORY_BOUNDS] = choose_quantile(summary.category_events, params.bounds_quantile,
                                                   plan[CATEGORY_BOUNDS].epsilon, params.max_category_events_upper)
        t = choices[CATEGORY_BOUNDS].k
        # T alone bounds a user: Kc and Cc are lifted (every public category, T events in one).
        params = replace(params, max_category_events_per_user=t, max_events_per_category=t,
                         max_categories_per_user=len(params.public_categories))
    if params.components() != reserved:  # K, T change sensitivities only, never the ledger's components
        raise PrivrecError("dp_stats: the chosen bounds changed the release's ledger components")
    noisy = add_noise(**noise_inputs(silver, params, salt, summary, catalog_items, public))
    for name, choice in choices.items():
        noisy.mechanisms[name] = choice.description
    return params, noisy, choices


def noise_inputs(silver: "DataFrame", params: DPStatsParams, salt: str, summary: UserSummary,
                 catalog_items: "pa.Table | None" = None, public: "DataFrame | None" = None) -> dict[str, Any]:
    """The arguments of ``noise.add_noise`` at fixed bounds: the bounded aggregates (collected)
    and the dropped counts of the bias statistics, from ``summary`` (``bounding.user_summary``)."""
    import pyarrow as pa

    aggregates = bounded_aggregates(silver, params, salt=salt, catalog=public)
    plan = params.plan()
    dropped = (None if "bounding_bias" not in plan
               else dropped_contributions(summary.items, params.max_items_per_user, params.bias_cap()))
    # Scaled category bounds drop max(min(e, Bc) - L, 0) of a user's e events (in total).
    category_dropped = (None if "category_bias" not in plan else dropped_contributions(
        summary.category_events, params.category_l1(), params.category_bias_cap()))
    funnel = pa.table({t: [summary.funnel[t]] for t in EVENT_TYPES})  # = aggregates.funnel, without its job
    return {"items": aggregates.items.toArrow(), "funnel": funnel, "categories": aggregates.categories.toArrow(),
            "purchases": aggregates.purchases.toArrow(), "params": params,
            "public_items": None if catalog_items is None else catalog_items.column("item_id").to_pylist(),
            "dropped": dropped, "category_dropped": category_dropped}


def _compute(spark: "SparkSession", lake: str, day: dt.date, params: DPStatsParams, release: Release,
             ledger: Ledger, catalog: CatalogSnapshot | None, catalog_items: "pa.Table | None") -> dict[str, Any]:
    silver_uri = lk.partition_uri(lake, "silver", day)
    silver = spark.read.parquet(silver_uri)
    public = None if catalog_items is None else spark.createDataFrame(catalog_items.to_pandas())
    # The bounding hash is keyed by the day: reruns bound the same way.
    params, noisy, choices = compute_release(silver, params, f"privrec-dp-stats-{day.isoformat()}",
                                             catalog_items, public)
    plan = params.plan()
    built = check_as_built(plan, noisy.mechanisms)
    statistics = {name: {"mechanism": budget.mechanism, "epsilon": budget.epsilon, "delta": budget.delta,
                         "sensitivity": budget.sensitivity, "noise_scale": budget.noise_scale,
                         "as_built": built.get(name)}
                  for name, budget in plan.items()}
    components = params.components()
    basic_e, basic_d = basic_composition([(b.epsilon, b.delta) for b in plan.values()])
    doc: dict[str, Any] = {
        "release_id": release.id, "release_key": RELEASE_KEY, "generation": release.generation,
        "forced": release.forced, "date": day.isoformat(),
        "window": {"start": release.window_start.isoformat(), "end": release.window_end.isoformat()},
        "dag_id": release.dag_id, "run_id": release.run_id, "privacy_unit": "user (user_pseudonym)",
        "epsilon": basic_e, "delta": basic_d, "confidence_level": params.confidence_level,
        "composition": {
            "basic": {"epsilon": basic_e, "delta": basic_d},
            "tight_pld": {"epsilon": composed_epsilon(components, ledger.policy.delta),
                          "delta": ledger.policy.delta},
        },
        "mechanism_components": [c.to_dict() for c in components],
        "statistics": statistics,
        "bounds": {**{k: getattr(params, k) for k in (
            "max_items_per_user", "max_events_per_item", "max_categories_per_user", "max_events_per_category",
            "max_category_events_per_user", "max_purchases_per_user", "price_lower", "price_upper")},
            "chosen": _chosen_text(params, choices)},
        "bounding": noisy.bounding,
        "params": params.to_dict(),
        "released": {"items": noisy.items.num_rows, "categories": noisy.categories.num_rows},
        "keys": ({"source": "catalog (public partitions)", "catalog": catalog.to_dict()} if catalog is not None
                 else {"source": "DP partition selection"}),
        "purchases": noisy.purchases,
        "files": {**{t: f"{t}.parquet" for t in TABLES}, "report": REPORT_FILE,
                  "vocabulary": "items.parquet (item_id, ordered by noisy users)"},
        "input": {"silver": silver_uri},
        "libraries": _library_versions(),
    }
    doc["_tables"] = noisy
    return doc


def _chosen_text(params: DPStatsParams, choices: dict[str, ChosenBound]) -> str:
    if not choices:
        return "by hand"
    ranges = {ITEM_BOUNDS: f"K in 1..{params.max_items_upper}",
              CATEGORY_BOUNDS: f"T in 1..{params.max_category_events_upper}"}
    return f"auto (DP {params.bounds_quantile:g}-quantile by the exponential mechanism, " + "; ".join(
        f"epsilon {c.epsilon:.4g}, {ranges[name]}" for name, c in choices.items()) + ")"


def check_as_built(plan: dict[str, StatisticBudget], built: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """PyDP's own description of each mechanism it drew noise with, checked against the plan
    the ledger accounted: a mechanism built at another epsilon, sensitivity or scale than the
    plan (or a planned statistic released without its mechanism) fails the release before
    anything is written. Statistics that had no key to noise (nothing selected) have none."""
    unplanned = sorted(set(built) - set(plan))
    if unplanned:
        raise PrivrecError(f"dp_stats: mechanisms {unplanned} were used but not planned (nor accounted)")
    for name, mechanism in built.items():
        budget = plan[name]
        expected = {"mechanism": budget.mechanism, "epsilon": budget.epsilon}
        if budget.mechanism == "laplace":
            expected.update(l1_sensitivity=budget.sensitivity, noise_scale=budget.noise_scale)
        elif budget.mechanism == "exponential":
            expected.update(delta=0.0, global_sensitivity=budget.sensitivity)
        else:
            expected.update(delta=budget.delta, max_partitions_contributed=int(budget.sensitivity))
        wrong = {k: (v, mechanism.get(k)) for k, v in expected.items()
                 if not (mechanism.get(k) == v or (isinstance(v, float) and isinstance(mechanism.get(k), float)
                                                  and math.isclose(mechanism[k], v, rel_tol=1e-9)))}
        if wrong:
            raise PrivrecError(f"dp_stats: the {name} mechanism was not built as planned "
                               + ", ".join(f"{k}: planned {_num(v)}, built {_num(b)}" for k, (v, b) in wrong.items()))
    return built


def _num(value: Any) -> Any:
    return format(value, ".6g") if isinstance(value, float) else value


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("python-dp", "dp-accounting", "pyspark"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _write_local(folder: str, doc: dict[str, Any], noisy: NoisyRelease) -> None:
    import pyarrow.parquet as pq

    for name in TABLES:
        pq.write_table(getattr(noisy, name), f"{folder}/{name}.parquet", compression="zstd")
    with open(f"{folder}/{RELEASE_FILE}", "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    page = render_release_page(doc, noisy.items.to_pylist(), noisy.funnel.to_pylist(), noisy.categories.to_pylist())
    with open(f"{folder}/{REPORT_FILE}", "w", encoding="utf-8") as fh:
        fh.write(page)
