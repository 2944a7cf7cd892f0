"""The dp_stats step on Spark: contribution bounding holds against a heavy user, and a day's
release is accounted, idempotent, forced reruns spend, and nothing exact or identifying
leaves it."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DAY
from privrec_pipeline import lake as lk
from privrec_pipeline.dp_stats.bounding import bounded_aggregates
from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.dp_stats.release import dp_stats_uri, run_dp_stats
from privrec_pipeline.errors import (
    ConfigurationError,
    PrivacyBudgetExceeded,
    PrivrecError,
    QualityGateFailed,
    ReleaseInProgress,
    ReleaseMismatch,
)
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.privacy.accounting import Component
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.validate import run_validate
from privrec_pipeline.schema import EVENT_TYPES
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day

pytestmark = pytest.mark.spark
COLUMNS = "event_id string, user_pseudonym string, item_id string, category string, event_type string, price double"
HEAVY = "f" * 64


def _events(n_users: int = 40) -> list[tuple]:
    rows = []
    for u in range(n_users):
        user = f"{u:064x}"
        for j in range(6):
            rows.append((f"e-{u}-{j}", user, f"item-{(u + j) % 15}", f"cat-{j % 4}",
                         EVENT_TYPES[j % 4], 10.0 + j))
    return rows


def _heavy_user() -> list[tuple]:
    """10,000 events of one user over 60 items, every type, 12 categories, absurd prices."""
    return [(f"h-{i}", HEAVY, f"item-{i % 60}", f"cat-{i % 12}", EVENT_TYPES[i % len(EVENT_TYPES)], 1e9)
            for i in range(10_000)]


def _collect(aggs) -> dict:
    return {
        "items": {r["item_id"]: r.asDict() for r in aggs.items.collect()},
        "funnel": aggs.funnel.first().asDict(),
        "categories": {r["category"]: r.asDict() for r in aggs.categories.collect()},
        "purchases": aggs.purchases.first().asDict(),
    }


def test_one_user_with_10000_events_changes_any_count_by_at_most_the_bound(spark):
    params = DPStatsParams(max_items_per_user=4, max_events_per_item=3, max_categories_per_user=2,
                           max_events_per_category=5, max_purchases_per_user=2, price_lower=0.0, price_upper=100.0)
    base = spark.createDataFrame(_events(), COLUMNS)
    with_heavy = base.unionByName(spark.createDataFrame(_heavy_user(), COLUMNS))
    without, heavy = (_collect(bounded_aggregates(df, params, "salt")) for df in (base, with_heavy))

    changed_items = 0
    for item in set(without["items"]) | set(heavy["items"]):
        a = without["items"].get(item, {"users": 0, **{t: 0 for t in EVENT_TYPES}})
        b = heavy["items"].get(item, {"users": 0, **{t: 0 for t in EVENT_TYPES}})
        assert 0 <= b["users"] - a["users"] <= 1
        events = sum(b[t] - a[t] for t in EVENT_TYPES)
        assert 0 <= events <= params.max_events_per_item
        changed_items += b["users"] != a["users"]
    assert changed_items == params.max_items_per_user  # the heavy user counts on exactly K items
    total_events = sum(heavy["items"][i][t] for i in heavy["items"] for t in EVENT_TYPES) - \
        sum(without["items"][i][t] for i in without["items"] for t in EVENT_TYPES)
    assert total_events <= params.max_items_per_user * params.max_events_per_item  # L1 of the item table

    for t in EVENT_TYPES:  # the funnel counts a user at most once per event type
        assert heavy["funnel"][t] - without["funnel"][t] == 1
    changed_categories = [c for c in heavy["categories"]
                          if heavy["categories"][c]["users"] != without["categories"].get(c, {}).get("users", 0)]
    assert len(changed_categories) <= params.max_categories_per_user
    for c in changed_categories:
        gained = heavy["categories"][c]["events"] - without["categories"].get(c, {}).get("events", 0)
        assert 0 < gained <= params.max_events_per_category
    # Purchases: at most M, each clamped to the bounds and centred (|price - 50| <= 50).
    assert heavy["purchases"]["purchases"] - without["purchases"]["purchases"] == params.max_purchases_per_user
    shift = heavy["purchases"]["price_sum_centred"] - without["purchases"]["price_sum_centred"]
    assert abs(shift) <= params.max_purchases_per_user * (params.price_upper - params.price_lower) / 2


def test_a_category_total_cap_bounds_a_users_category_events(spark):
    # T = 7 with Kc and Cc lifted (as chosen bounds set them): the heavy user's 10,000 events in
    # 12 categories add at most 7 events to the category table in total (L1 = T), from its most
    # used categories first, and the other users' counts stay as they were.
    params = DPStatsParams(max_categories_per_user=12, max_events_per_category=7, max_category_events_per_user=7)
    assert params.plan()["category_events"].sensitivity == 7
    base = spark.createDataFrame(_events(), COLUMNS)
    with_heavy = base.unionByName(spark.createDataFrame(_heavy_user(), COLUMNS))
    without, heavy = (_collect(bounded_aggregates(df, params, "salt"))["categories"] for df in (base, with_heavy))
    gained = {c: heavy[c]["events"] - without.get(c, {}).get("events", 0) for c in heavy}
    assert all(g >= 0 for g in gained.values()) and sum(gained.values()) == 7
    # Every light user (6 events in 4 categories) keeps all of its events under T = 7.
    assert sum(r["events"] for r in without.values()) == 40 * 6
    # A smaller T keeps fewer of a light user's events, never more than T of anybody's.
    small = _collect(bounded_aggregates(base, replace(params, max_category_events_per_user=2), "salt"))
    assert sum(r["events"] for r in small["categories"].values()) == 40 * 2


def test_scaled_bounds_of_public_keys_move_the_tables_by_at_most_k_and_l_in_l1(spark):
    # Public items and categories: the heavy user's 60 items each count K / 60 and its 10,000
    # events in 12 categories L / 10,000 each, so it moves the item user counts by exactly K in
    # L1, the event table by at most K x C, the category events by exactly L (= Kc x Cc = 10).
    # A light user (6 items, 6 events) counts 4 / 6 for each of its items, its events whole.
    params = DPStatsParams(max_items_per_user=4, max_events_per_item=3, max_categories_per_user=2,
                           max_events_per_category=5, public_items=True,
                           public_categories=tuple(f"cat-{c}" for c in range(12)))
    base = spark.createDataFrame(_events(), COLUMNS)
    with_heavy = base.unionByName(spark.createDataFrame(_heavy_user(), COLUMNS))
    without, heavy = (_collect(bounded_aggregates(df, params, "salt")) for df in (base, with_heavy))
    moved = {i: heavy["items"][i]["users"] - without["items"].get(i, {}).get("users", 0) for i in heavy["items"]}
    assert all(0 <= m <= 1 for m in moved.values()) and sum(moved.values()) == pytest.approx(4)
    assert sum(1 for m in moved.values() if m > 0) == 60  # every one of its items keeps a share (4 / 60)
    events = sum(heavy["items"][i][t] - without["items"].get(i, {}).get(t, 0) for i in heavy["items"]
                 for t in EVENT_TYPES)
    assert 0 < events <= 4 * 3 + 1e-9
    # Each light user has 6 distinct items: 40 users x 4 = 160 user-item units in all.
    assert sum(r["users"] for r in without["items"].values()) == pytest.approx(40 * 4)
    gained = {c: heavy["categories"][c]["events"] - without["categories"].get(c, {}).get("events", 0)
              for c in heavy["categories"]}
    assert all(g >= 0 for g in gained.values()) and sum(gained.values()) == pytest.approx(params.category_l1())
    assert params.plan()["category_events"].sensitivity == params.category_l1() == 10
    # A light user's 6 events are under L = 10: kept whole.
    assert sum(r["events"] for r in without["categories"].values()) == pytest.approx(40 * 6)


def test_bounding_keeps_rare_event_types_and_is_the_same_on_every_run(spark):
    params = DPStatsParams(max_items_per_user=1, max_events_per_item=2)
    rows = [(f"v{i}", HEAVY, "item-a", "c", "view", 1.0) for i in range(50)] + \
        [("p1", HEAVY, "item-a", "c", "purchase", 1.0), ("c1", HEAVY, "item-a", "c", "add_to_cart", 1.0)]
    df = spark.createDataFrame(rows, COLUMNS)
    first = _collect(bounded_aggregates(df, params, "salt"))["items"]["item-a"]
    assert (first["purchase"], first["add_to_cart"], first["view"]) == (1, 1, 0)
    many = spark.createDataFrame(_events(), COLUMNS)
    runs = [sorted(map(str, bounded_aggregates(many, params, "salt").items.collect())) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def validated_lake(spark, tmp_path_factory, keyring) -> Path:
    root = tmp_path_factory.mktemp("dp_stats") / "lake"
    generate_day(GeneratorConfig(date=DAY, events=3000, users=150, items=60, seed=21), str(root))
    run_collect(spark, str(root), DAY, keyring)
    run_pseudonymize(spark, str(root), DAY, keyring)
    run_validate(spark, str(root), DAY, QualityConfig())
    return root


@pytest.fixture()
def day_lake(validated_lake, tmp_path) -> Path:
    target = tmp_path / "lake"
    shutil.copytree(validated_lake, target)
    return target


# Generous enough that a 150-user day releases items (threshold about a dozen users). Bounds fixed
# by hand (the default chooses them when the day has a catalog: AUTO below).
PARAMS = DPStatsParams(epsilon=20.0, delta=1e-6, bounds="fixed")
# Without the catalog the generator writes: items and categories chosen by partition selection.
SELECTION = DPStatsParams(epsilon=20.0, delta=1e-6, use_catalog=False)


def _ledger(lake: Path, cap: float = 1000.0) -> Ledger:
    return Ledger(f"sqlite:///{lake}/ledger.db", BudgetPolicy(epsilon=cap, delta=1e-3, window_days=30))


def _items(uri: str):
    return pq.read_table(f"{uri}/items.parquet").to_pylist()


def test_release_is_written_accounted_and_holds_only_dp_values(spark, day_lake):
    ledger = _ledger(day_lake)
    result = run_dp_stats(spark, str(day_lake), DAY, SELECTION, ledger, run_id="run-1", dag_id="privrec_nightly")
    assert result.status == "new"
    out = Path(result.uri)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= {
        "items.parquet", "funnel.parquet", "categories.parquet", "release.json", "report.html"}
    doc = json.loads((out / "release.json").read_text())
    assert doc["epsilon"] == pytest.approx(20.0) and doc["delta"] == pytest.approx(1e-6)
    assert sum(s["epsilon"] for s in doc["statistics"].values()) == pytest.approx(20.0)
    # item_users gets 0.2 / 1.02 of epsilon 20 (the default weights sum to 1.02) and has
    # sensitivity K = 5: PyDP built b = 5 / (20 x 0.2 / 1.02).
    assert doc["statistics"]["item_users"]["as_built"]["noise_scale"] == pytest.approx(5 / (20 * 0.2 / 1.02))
    assert doc["statistics"]["item_users"]["as_built"]["library"] == "PyDP LaplaceMechanism"
    assert doc["statistics"]["item_selection"]["as_built"]["epsilon"] == pytest.approx(20 * 0.4 / 1.02)
    # The bounding bias (fixed K = 5): a DP share of dropped contributions, shown on the page.
    assert doc["bounding"]["max_items_per_user"] == 5 and 0 <= doc["bounding"]["dropped_share"] <= 1
    assert doc["bounds"]["chosen"] == "by hand"
    assert "interval of the bounded count" in (out / "report.html").read_text()
    assert "Bounding bias" in (out / "report.html").read_text()
    assert doc["composition"]["tight_pld"]["epsilon"] <= doc["composition"]["basic"]["epsilon"] + 1e-6
    [release] = ledger.releases()
    assert (release.state, release.id, release.epsilon) == ("committed", doc["release_id"], pytest.approx(20.0))

    items = _items(result.uri)
    assert 0 < len(items) == doc["released"]["items"]
    assert [r["users"] for r in items] == sorted((r["users"] for r in items), reverse=True)
    assert all(r["users_low"] <= r["users"] <= r["users_high"] for r in items)
    # Only items that many users touched are released (a one-user item: probability < 1e-7).
    silver = spark.read.parquet(lk.partition_uri(str(day_lake), "silver", DAY))
    users_per_item = {r["item_id"]: r["n"] for r in
                      silver.groupBy("item_id").agg({"user_pseudonym": "approx_count_distinct"})
                      .withColumnRenamed("approx_count_distinct(user_pseudonym)", "n").collect()}
    assert min(users_per_item[r["item_id"]] for r in items) >= 2
    funnel = pq.read_table(f"{result.uri}/funnel.parquet").to_pylist()
    assert [r["event_type"] for r in funnel] == list(EVENT_TYPES)

    # No pseudonym, no exact count: nothing in the release identifies a user or a raw total.
    pseudonyms = {r[0] for r in silver.select("user_pseudonym").distinct().collect()}
    text = "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix in (".json", ".html"))
    assert not pseudonyms & set(re.findall(r"[0-9a-f]{64}", text))
    assert str(silver.count()) not in json.dumps(doc["released"])
    assert "Top" in (out / "report.html").read_text() and "<svg" in (out / "report.html").read_text()


def test_with_a_catalog_every_catalog_item_is_released_without_selection(spark, day_lake):
    from privrec_pipeline import catalog as cat

    # The day's catalog: 40 of the generated items (the others' events are left out) and one
    # item nobody touched, which is released all the same (a public partition).
    generated = cat.read_items(cat.snapshot_for(str(day_lake), DAY)).to_pylist()
    listed = [*generated[:40], {"item_id": "itm_never_seen", "category": "books"}]
    cat.write_snapshot(str(day_lake), DAY, pa.Table.from_pylist(listed), "test catalog")
    ledger = _ledger(day_lake)
    result = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    doc = result.release
    assert doc["keys"]["source"] == "catalog (public partitions)" and doc["keys"]["catalog"]["items"] == 41
    # No selection, so no delta: the catalog's weights (summing to 1) split epsilon.
    assert "item_selection" not in doc["statistics"] and "category_selection" not in doc["statistics"]
    assert (doc["epsilon"], doc["delta"]) == (pytest.approx(20.0), 0.0)
    [release] = ledger.releases()
    assert (release.epsilon, release.delta) == (pytest.approx(20.0), 0.0)
    # item_users: weight 0.68 -> epsilon 20 x 0.68, sensitivity K = 5.
    b = 5 / (20 * 0.68)
    assert doc["statistics"]["item_users"]["as_built"]["noise_scale"] == pytest.approx(b)
    items = {r["item_id"]: r for r in _items(result.uri)}
    assert set(items) == {r["item_id"] for r in listed}
    assert abs(items["itm_never_seen"]["users"]) <= b * 40  # noise of a zero count, P(|x| > 40 b) ~ e^-40
    categories = {r["category"] for r in pq.read_table(f"{result.uri}/categories.parquet").to_pylist()}
    assert categories == {r["category"] for r in listed}
    # Exact distinct users of a listed item (the cap K = 5 binds for few users of this day), and
    # the estimate of the unbounded count: the noisy count over the noisy kept share.
    silver = spark.read.parquet(lk.partition_uri(str(day_lake), "silver", DAY))
    top = max(listed[:40], key=lambda r: items[r["item_id"]]["users"])["item_id"]
    exact = silver.where(silver.item_id == top).select("user_pseudonym").distinct().count()
    assert items[top]["users"] <= exact + b * 40
    share = doc["bounding"]["kept_share"]
    assert 0 < share <= 1 and items[top]["users_estimate"] == round(items[top]["users"] / share)
    assert doc["bounding"]["category"]["kept_share"] is not None
    estimated = [r["events_estimate"] for r in pq.read_table(f"{result.uri}/categories.parquet").to_pylist()]
    assert all(e is not None for e in estimated)
    # A resume must present the same catalog: another one is another release description.
    from privrec_pipeline.dp_stats.release import release_parameters, with_catalog

    params, snapshot, _ = with_catalog(PARAMS, str(day_lake), DAY)
    assert release_parameters(params, "fp", snapshot)["catalog"]["sha256"] == snapshot.sha256
    with pytest.raises(ConfigurationError, match="public_items is set from the catalog"):
        with_catalog(DPStatsParams(public_items=True), str(day_lake), DAY)


def test_reruns_reuse_the_release_and_forced_reruns_spend(spark, day_lake):
    ledger = _ledger(day_lake)
    first = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    noisy = _items(first.uri)
    retry = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    rerun = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-2")
    assert retry.status == rerun.status == "reuse"
    assert _items(rerun.uri) == noisy  # the noise was drawn once
    assert len(ledger.releases()) == 1 and ledger.spend_at(DAY).basic_epsilon == pytest.approx(20.0)

    forced = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-3", force=True)
    assert forced.status == "new" and forced.release["generation"] == 1 and forced.release["forced"]
    assert forced.release["release_id"] != first.release["release_id"]
    assert ledger.spend_at(DAY).basic_epsilon == pytest.approx(40.0)
    assert run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-4").release["release_id"] == \
        forced.release["release_id"]  # later reruns reuse the newest release


def test_a_release_over_the_budget_fails_before_reading_data(spark, day_lake):
    ledger = _ledger(day_lake, cap=30.0)
    run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    shutil.rmtree(lk.path(lk.partition_uri(str(day_lake), "silver", DAY)))  # proves silver is not read
    with pytest.raises(PrivacyBudgetExceeded) as info:
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-2", force=True)
    message = str(info.value)
    assert "needs epsilon 20" in message and "the cap is epsilon 30" in message
    assert [r.state for r in ledger.releases()] == ["committed"]


def test_a_failed_computation_returns_the_reservation(spark, day_lake):
    ledger = _ledger(day_lake)
    shutil.rmtree(lk.path(lk.partition_uri(str(day_lake), "silver", DAY)))
    with pytest.raises(Exception, match=r"(?i)path does not exist|PATH_NOT_FOUND"):
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    [release] = ledger.releases()
    assert release.state == "failed" and ledger.spend_at(DAY).epsilon == 0.0
    assert not lk.path(dp_stats_uri(str(day_lake), DAY)).exists()


def test_a_day_that_failed_validation_gets_no_release(spark, day_lake):
    summary = lk.path(f"{lk.partition_uri(str(day_lake), 'reports', DAY)}/summary.json")
    doc = json.loads(summary.read_text())
    summary.write_text(json.dumps({**doc, "gate": "failed", "failed_critical": ["event_id.unique"]}))
    ledger = _ledger(day_lake)
    with pytest.raises(QualityGateFailed, match=r"event_id\.unique"):
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger)
    assert ledger.releases() == []


def test_a_lost_release_is_not_silently_redrawn(spark, day_lake):
    ledger = _ledger(day_lake)
    first = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    shutil.rmtree(first.uri)
    with pytest.raises(PrivrecError, match="rerun with force"):
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-2")


def test_public_categories_are_released_without_selection(spark, day_lake):
    params = DPStatsParams(epsilon=5.0, public_categories=("books", "no-such-category"), use_catalog=False)
    result = run_dp_stats(spark, str(day_lake), DAY, params, _ledger(day_lake))
    categories = pq.read_table(f"{result.uri}/categories.parquet").to_pylist()
    assert sorted(r["category"] for r in categories) == ["books", "no-such-category"]
    assert "category_selection" not in result.release["statistics"]


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "0"], "DPStatsParams: epsilon must be positive"),
    (["--set", "max_items_per_user=0"], "max_items_per_user must be positive"),
    (["--config-json", "[1]"], "--config-json must be a JSON object"),
    (["--force", "maybe"], "expected true or false"),
])
def test_dp_stats_job_rejects_bad_settings_before_starting_spark(args, message, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_stats_job", Path(__file__).parents[1] / "jobs" / "dp_stats.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as info:
        job.parse_args(["--date", DAY.isoformat(), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def _killed_reservation(spark, lake: Path, ledger: Ledger, params: DPStatsParams, run_id: str):
    """What a run killed right after reserving leaves behind: an open reservation, no partition."""
    from privrec_pipeline.dp_stats.release import RELEASE_KEY, release_parameters, with_catalog
    from privrec_pipeline.manifest import pseudonym_fingerprint

    params, catalog, _ = with_catalog(params, str(lake), DAY)
    epsilon, delta = params.spent()
    return ledger.reserve(RELEASE_KEY, DAY, DAY, params.components(), epsilon=epsilon, delta=delta, dag_id="d",
                          run_id=run_id, parameters=release_parameters(
                              params, pseudonym_fingerprint(lk.Lake(str(lake)), str(lake), DAY), catalog)).release


def test_a_resumed_release_computes_exactly_what_the_ledger_holds(spark, day_lake):
    """Run 1 reserves epsilon 20 and dies; run 2 asks for epsilon 50 or other bounds: refused (the
    ledger would say 20 while the noise is for 50); with the reserved settings it takes over."""
    ledger = Ledger(f"sqlite:///{day_lake}/ledger.db", BudgetPolicy(epsilon=1000.0, delta=1e-3), lease_seconds=0)
    reserved = _killed_reservation(spark, day_lake, ledger, PARAMS, "run-1")
    for other in (DPStatsParams(epsilon=50.0, delta=1e-6), DPStatsParams(epsilon=20.0, delta=1e-6,
                                                                         max_items_per_user=50)):
        with pytest.raises(ReleaseMismatch, match="force_release"):
            run_dp_stats(spark, str(day_lake), DAY, other, ledger, run_id="run-2")
    assert not lk.path(dp_stats_uri(str(day_lake), DAY)).exists()  # nothing was computed
    resumed = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-2")
    [release] = ledger.releases()
    assert resumed.status == "resume" and release.id == reserved.id == resumed.release["release_id"]
    assert release.state == "committed" and release.epsilon == pytest.approx(resumed.release["epsilon"])


def test_a_live_reservation_of_another_run_is_not_computed_twice(spark, day_lake):
    ledger = _ledger(day_lake)  # leases of two hours
    _killed_reservation(spark, day_lake, ledger, PARAMS, "run-1")
    with pytest.raises(ReleaseInProgress, match="being computed by run run-1"):
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-2")
    [release] = ledger.releases()
    assert release.state == "reserved"  # run 2's failure did not fail run 1's release
    assert not lk.path(dp_stats_uri(str(day_lake), DAY)).exists()


def test_killed_between_swap_and_commit_the_retry_commits_without_new_noise(spark, day_lake, killed_before_commit):
    ledger = _ledger(day_lake)
    with killed_before_commit():
        run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    [release] = ledger.releases()
    target = dp_stats_uri(str(day_lake), DAY)
    assert release.state == "reserved" and json.loads(Path(target, "release.json").read_text())["release_id"] == \
        release.id  # in place, not yet committed
    noisy = _items(target)
    retry = run_dp_stats(spark, str(day_lake), DAY, PARAMS, ledger, run_id="run-1")
    assert retry.status == "reuse" and _items(target) == noisy  # committed as it was, no second draw
    assert [r.state for r in ledger.releases()] == ["committed"] and ledger.verify()[0] == []


AUTO = DPStatsParams(epsilon=20.0, delta=1e-6, bounds="auto", max_items_upper=30, max_category_events_upper=40)


def test_auto_bounds_choose_k_privately_and_report_the_bias(spark, day_lake):
    from privrec_pipeline.dp_stats.release import release_parameters, with_catalog
    from privrec_pipeline.privacy.accounting import pure_epsilon

    ledger = _ledger(day_lake)
    result = run_dp_stats(spark, str(day_lake), DAY, AUTO, ledger, run_id="run-1")
    doc = result.release
    k = doc["bounds"]["max_items_per_user"]
    assert 1 <= k <= 30 and doc["bounds"]["chosen"] == (
        "auto (DP 0.5-quantile by the exponential mechanism, epsilon 0.6, K in 1..30; epsilon 0.6, T in 1..40)")
    t = doc["bounds"]["max_category_events_per_user"]
    assert 1 <= t <= 40 and doc["bounds"]["max_events_per_category"] == t
    assert doc["bounds"]["max_categories_per_user"] == len(doc["params"]["public_categories"])  # T alone binds
    assert doc["bounding"]["max_items_per_user"] == k and 0 <= doc["bounding"]["dropped_share"] <= 1
    # Each choice costs 0.03 of epsilon (pure), the statistics share the rest; the ledger was
    # charged exactly the plan, each choice as an (epsilon, 0) component.
    stats = doc["statistics"]
    for choice in ("item_bounds", "category_bounds"):
        assert stats[choice]["as_built"]["mechanism"] == "exponential"
        assert stats[choice]["epsilon"] == pytest.approx(0.6) and stats[choice]["delta"] == 0.0
    assert stats["item_users"]["as_built"]["l1_sensitivity"] == k  # noise built with the chosen K
    assert stats["category_events"]["as_built"]["l1_sensitivity"] == t  # ... and T
    assert sum(s["epsilon"] for s in stats.values()) == pytest.approx(20.0)
    charged = {c["label"]: pure_epsilon(Component.from_dict(c)) for c in doc["mechanism_components"]}
    assert charged["item_bounds"] == charged["category_bounds"] == (pytest.approx(0.6), 0.0)
    assert charged["bounding_bias"][0] == pytest.approx(stats["bounding_bias"]["epsilon"])
    assert charged["category_bias"][0] == pytest.approx(stats["category_bias"]["epsilon"])
    [release] = ledger.releases()
    assert (release.epsilon, release.delta) == (pytest.approx(20.0), 0.0)
    # The reserved description holds nothing that depends on K.
    params, snapshot, _ = with_catalog(AUTO, str(day_lake), DAY)
    described = release_parameters(params, "fp", snapshot)["statistics"]
    assert described["item_users"]["sensitivity"] == described["item_users"]["noise_scale"] == "auto"
    assert described["category_events"]["sensitivity"] == "auto"
    # The default settings choose the bounds the same way when the day has a catalog, and fix
    # them when it has none.
    default, _, _ = with_catalog(DPStatsParams(), str(day_lake), DAY)
    assert default.bound_choices() == ("item_bounds", "category_bounds")
    assert DPStatsParams(use_catalog=False).bound_choices() == ()
    assert described["item_users"]["epsilon"] == pytest.approx(stats["item_users"]["epsilon"])
    # Without a catalog the number of items is private: auto bounds are refused before reserving.
    with pytest.raises(ConfigurationError, match="bounds 'auto' needs the day's catalog"):
        run_dp_stats(spark, str(day_lake), DAY, replace(AUTO, use_catalog=False), ledger, run_id="run-2", force=True)
    assert len(ledger.releases()) == 1


def test_a_resumed_auto_release_must_present_the_reserved_settings(spark, day_lake):
    ledger = Ledger(f"sqlite:///{day_lake}/ledger.db", BudgetPolicy(epsilon=1000.0, delta=1e-3), lease_seconds=0)
    reserved = _killed_reservation(spark, day_lake, ledger, AUTO, "run-1")
    for other in (replace(AUTO, bounds_epsilon_share=0.1), replace(AUTO, max_items_upper=40), PARAMS):
        with pytest.raises(ReleaseMismatch, match="force_release"):
            run_dp_stats(spark, str(day_lake), DAY, other, ledger, run_id="run-2")
    resumed = run_dp_stats(spark, str(day_lake), DAY, AUTO, ledger, run_id="run-2")
    assert resumed.status == "resume" and resumed.release["release_id"] == reserved.id
    assert resumed.release["bounds"]["chosen"].startswith("auto")


def test_the_user_summary_is_the_histograms_and_the_funnel_of_the_bounding(spark):
    # One job computes what the release needs besides the bounded aggregates: it must be the
    # per-user histograms and exactly the funnel bounded_aggregates computes.
    from privrec_pipeline.dp_stats.bounding import (
        category_events_per_user_histogram,
        items_per_user_histogram,
        user_summary,
    )

    params = DPStatsParams(public_categories=("cat-0", "cat-1", "cat-5"))
    rows = _events() + _heavy_user() + [("n-1", None, "item-1", "cat-0", "view", 1.0),
                                        ("n-2", HEAVY, None, "cat-1", "purchase", 1.0)]
    df = spark.createDataFrame(rows, COLUMNS)
    summary = user_summary(df, params, 50, 30)
    assert summary.items == items_per_user_histogram(df, 50) == {6: 40, 50: 1}
    assert summary.category_events == category_events_per_user_histogram(df, params, 30)
    assert summary.category_events == {4: 40, 30: 1}  # 4 of the 6 events of _events are in cat-0 or cat-1
    assert summary.funnel == _collect(bounded_aggregates(df, params, "salt"))["funnel"]
