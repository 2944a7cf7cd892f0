"""Contribution bounding and the bounded aggregates, in Spark SQL (JVM only, no Python rows).

Bound contributions before noise, else the sensitivity is unbounded: one user with 10,000
events would move every count by 10,000. Per user (the privacy unit):

- items: at most C events per (user, item), taken in a fixed order of event types, rarest
  first (purchase, add_to_cart, remove_from_cart, rating, view), so the informative events
  survive; at most K items per user: the user's most used items (most events), ties broken
  by a keyed hash of (user, item). The choice depends on nothing but the user's own data, so
  no other user can change which of a user's items count (and popular items, where counts
  are useful, keep most of their users);
- categories: at most Cc events per (user, category), at most Kc categories per user, the
  same way; with T set, at most T events of the user over all its kept categories together,
  taken from its most used categories first (a cumulative cap: L1 = min(Kc Cc, T), as
  PipelineDP's ``max_contributions`` bounds a privacy unit's total contributions);
- purchase prices: clamped to [lo, hi]; at most M purchases per user (hash of the event id).
Events without a user or key (null item, null category) contribute to no key.

That is truncation, which partition selection needs (a user in at most K keys). When the keys
are public (a catalog's items, public categories) nothing is selected and only each user's L1
contribution must be bounded, so contributions are scaled instead (``scale_items``,
``scale_categories``): a user with n items counts min(1, K / n) for each of them (its capped
events per item scaled alike), a user with e events in public categories min(1, L / e) per
event (L = ``category_l1``). A user's items and categories all keep a share, none is dropped
whole, so what bounding leaves out is spread evenly over a user's keys, and dividing a count by
the kept share estimates the unbounded count (``noise.add_noise``; Amin, Kulesza, Munoz Medina
& Vassilvitskii 2019 on clipping's bias). The aggregates are then fractional.

Each aggregate then has one row per key with the bounded values, small enough for the
driver, where PyDP adds noise (``dp_stats.noise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.schema import EVENT_TYPES, EventType

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

USER, ITEM, CATEGORY = "user_pseudonym", "item_id", "category"
# Rarest and most informative first: a capped (user, item) keeps its purchase over its views.
TYPE_PRIORITY: tuple[str, ...] = (EventType.PURCHASE, EventType.ADD_TO_CART, EventType.REMOVE_FROM_CART,
                                  EventType.RATING, EventType.VIEW)
assert set(TYPE_PRIORITY) == set(EVENT_TYPES)


@dataclass(frozen=True)
class BoundedAggregates:
    """The bounded, not yet noisy, aggregates of one release (lazy DataFrames)."""

    items: "DataFrame"  # item_id, users, <event type>... (events per type)
    funnel: "DataFrame"  # one row: <event type>... (distinct users per type)
    categories: "DataFrame"  # category, users, events
    purchases: "DataFrame"  # one row: price_sum_centred, purchases


def _rank_within_user(key: "Column", salt: str, weight: "Column | None" = None) -> "Column":
    """1, 2, ... over a user's keys: by ``weight`` descending (if given), then by a keyed hash,
    then by the key (so the order is total and the same on every run)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = [F.xxhash64(F.lit(salt), F.col(USER), key), key]
    if weight is not None:
        order.insert(0, weight.desc())
    return F.row_number().over(Window.partitionBy(USER).orderBy(*order))


def bound_items(silver: "DataFrame", params: DPStatsParams, salt: str) -> "DataFrame":
    """One row per kept (user, item) (the user's K most used items): capped event counts by type."""
    from pyspark.sql import functions as F

    per, capped = _capped_pairs(silver, params)
    ranked = per.select(USER, ITEM, *capped, _rank_within_user(F.col(ITEM), salt, F.col("events")).alias("rank"))
    return ranked.where(F.col("rank") <= params.max_items_per_user).drop("rank")


def _capped_pairs(silver: "DataFrame", params: DPStatsParams) -> tuple["DataFrame", list["Column"]]:
    """(user, item) rows with their event counts by type, and those counts capped at C in
    ``TYPE_PRIORITY`` order (rarest first)."""
    from pyspark.sql import functions as F

    events = silver.where(F.col(USER).isNotNull() & F.col(ITEM).isNotNull())
    per = events.groupBy(USER, ITEM).agg(
        F.count(F.lit(1)).alias("events"),
        *[F.count(F.when(F.col("event_type") == t, 1)).alias(t) for t in EVENT_TYPES])
    capped, remaining = [], F.lit(params.max_events_per_item)
    for t in TYPE_PRIORITY:
        kept = F.least(F.col(t), remaining)
        capped.append(kept.alias(t))
        remaining = remaining - kept
    return per, capped


def scale_items(silver: "DataFrame", params: DPStatsParams) -> "DataFrame":
    """One row per (user, item): ``weight`` = min(1, K / n) for a user with n distinct items,
    and the capped event counts by type times the weight (public items: L1 <= K for the user
    counts, <= K x C for the event counts)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    per, capped = _capped_pairs(silver, params)
    weight = F.least(F.lit(1.0), F.lit(float(params.max_items_per_user))
                     / F.count(F.lit(1)).over(Window.partitionBy(USER)))
    with_weight = per.select(USER, ITEM, *capped, weight.alias("weight"))
    return with_weight.select(USER, ITEM, "weight", *[(F.col("weight") * F.col(t)).alias(t) for t in EVENT_TYPES])


def scale_categories(silver: "DataFrame", params: DPStatsParams) -> "DataFrame":
    """One row per (user, public category): its events times min(1, L / e) for a user with e
    events in public categories (L1 <= L = ``category_l1``)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    per = _category_events(silver, params).groupBy(USER, CATEGORY).agg(F.count(F.lit(1)).alias("events"))
    weight = F.least(F.lit(1.0), F.lit(float(params.category_l1()))
                     / F.sum("events").over(Window.partitionBy(USER)))
    return per.select(USER, CATEGORY, (F.col("events") * weight).alias("events"))


def _category_events(silver: "DataFrame", params: DPStatsParams) -> "DataFrame":
    """The events the category statistic counts: with a user and a (public) category."""
    from pyspark.sql import functions as F

    events = silver.where(F.col(USER).isNotNull() & F.col(CATEGORY).isNotNull())
    if params.public_categories:  # other categories are not keys of the release
        events = events.where(F.col(CATEGORY).isin(list(params.public_categories)))
    return events


def bound_categories(silver: "DataFrame", params: DPStatsParams, salt: str) -> "DataFrame":
    """One row per kept (user, category) with the capped event count."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    per = (_category_events(silver, params).groupBy(USER, CATEGORY).agg(F.count(F.lit(1)).alias("events")))
    ranked = per.select(USER, CATEGORY, F.least(F.col("events"), F.lit(params.max_events_per_category)).alias("events"),
                        _rank_within_user(F.col(CATEGORY), salt, F.col("events")).alias("rank"))
    kept = ranked.where(F.col("rank") <= params.max_categories_per_user)
    total = params.max_category_events_per_user
    if total is None:
        return kept.drop("rank")
    # T: the user's categories in rank order take what is left of T (a running sum of the
    # events of the categories ranked before), so the user's kept events add up to <= T.
    before = F.coalesce(F.sum("events").over(
        Window.partitionBy(USER).orderBy("rank").rowsBetween(Window.unboundedPreceding, -1)), F.lit(0))
    capped = kept.select(USER, CATEGORY, F.least(F.col("events"), F.greatest(F.lit(total) - before, F.lit(0)))
                         .alias("events"))
    return capped.where(F.col("events") > 0)


def bound_purchases(silver: "DataFrame", params: DPStatsParams, salt: str) -> "DataFrame":
    """One row per kept purchase: the clamped price minus the clamp's midpoint."""
    from pyspark.sql import functions as F

    lo, hi = params.price_lower, params.price_upper
    price = F.col("price")
    purchases = silver.where((F.col("event_type") == EventType.PURCHASE) & F.col(USER).isNotNull()
                             & price.isNotNull() & ~F.isnan(price))
    clamped = F.greatest(F.lit(lo), F.least(F.lit(hi), price))
    ranked = purchases.select(USER, (clamped - F.lit((lo + hi) / 2)).alias("price_centred"),
                              _rank_within_user(F.col("event_id"), salt).alias("rank"))
    return ranked.where(F.col("rank") <= params.max_purchases_per_user).drop("rank")


def catalog_events(silver: "DataFrame", catalog: "DataFrame") -> "DataFrame":
    """The events of catalog items, each with its item's catalog category (the public item ->
    category map, not the event's own field). Events of other items are dropped before any
    bounding, so a user's K item slots go to catalog items (PipelineDP drops contributions to
    non-public partitions the same way); the quality report counts them."""
    from pyspark.sql import functions as F

    return silver.drop(CATEGORY).join(F.broadcast(catalog.select(ITEM, CATEGORY)), ITEM, "inner")


def bounded_aggregates(silver: "DataFrame", params: DPStatsParams, salt: str,
                       catalog: "DataFrame | None" = None) -> BoundedAggregates:
    """The bounded aggregates of ``silver`` (with ``catalog``: of the catalog's items only):
    truncated, or scaled where the keys are public (``params.public_items``,
    ``params.public_categories``; then item users and events and category events are fractional)."""
    from pyspark.sql import functions as F

    if catalog is not None:
        silver = catalog_events(silver, catalog)
    if params.public_items:
        item_aggs = scale_items(silver, params).groupBy(ITEM).agg(
            F.sum("weight").alias("users"), *[F.sum(t).alias(t) for t in EVENT_TYPES])
    else:
        item_aggs = bound_items(silver, params, salt).groupBy(ITEM).agg(
            F.count(F.lit(1)).alias("users"), *[F.sum(t).alias(t) for t in EVENT_TYPES])
    # A user counts once per event type it has, however its items are bounded.
    funnel = silver.where(F.col(USER).isNotNull() & F.col(ITEM).isNotNull()).groupBy().agg(
        *[F.countDistinct(F.when(F.col("event_type") == t, F.col(USER))).alias(t) for t in EVENT_TYPES])
    if params.public_categories:
        categories = scale_categories(silver, params).groupBy(CATEGORY).agg(
            F.count(F.lit(1)).alias("users"), F.sum("events").alias("events"))
    else:
        categories = bound_categories(silver, params, salt).groupBy(CATEGORY).agg(
            F.count(F.lit(1)).alias("users"), F.sum("events").alias("events"))
    purchases = bound_purchases(silver, params, salt).agg(
        F.coalesce(F.sum("price_centred"), F.lit(0.0)).alias("price_sum_centred"),
        F.count(F.lit(1)).alias("purchases"))
    return BoundedAggregates(item_aggs, funnel, categories, purchases)


def exact_statistics(silver: "DataFrame") -> BoundedAggregates:
    """The same statistics without bounding or noise (the non-private baseline of the benchmark
    and the reference of the error measurements; never released)."""
    from pyspark.sql import functions as F

    items = silver.groupBy(ITEM).agg(F.countDistinct(USER).alias("users"),
                                     *[F.count(F.when(F.col("event_type") == t, 1)).alias(t) for t in EVENT_TYPES])
    funnel = silver.groupBy().agg(
        *[F.countDistinct(F.when(F.col("event_type") == t, F.col(USER))).alias(t) for t in EVENT_TYPES])
    categories = silver.where(F.col(CATEGORY).isNotNull()).groupBy(CATEGORY).agg(
        F.countDistinct(USER).alias("users"), F.count(F.lit(1)).alias("events"))
    purchases = silver.where(F.col("event_type") == EventType.PURCHASE).agg(
        F.sum("price").alias("price_sum_centred"), F.count(F.lit(1)).alias("purchases"))
    return BoundedAggregates(items, funnel, categories, purchases)


def _histogram(per_user: "DataFrame") -> dict[int, int]:
    from pyspark.sql import functions as F

    return {int(r["c"]): int(r["n"]) for r in per_user.groupBy("c").agg(F.count(F.lit(1)).alias("n")).collect()}


def items_per_user_histogram(silver: "DataFrame", cap: int, catalog: "DataFrame | None" = None) -> dict[int, int]:
    """{c: number of users with c distinct items (c clamped to ``cap``)}, over the events that
    item bounding sees (with ``catalog``: catalog items only). A few hundred rows at most,
    collected to the driver to choose K and count what bounding dropped; never released."""
    from pyspark.sql import functions as F

    if catalog is not None:
        silver = catalog_events(silver, catalog)
    return _histogram(silver.where(F.col(USER).isNotNull() & F.col(ITEM).isNotNull())
                      .groupBy(USER).agg(F.least(F.countDistinct(ITEM), F.lit(cap)).alias("c")))


@dataclass(frozen=True)
class UserSummary:
    """Per-user counts the release needs besides the bounded aggregates, from one Spark job
    (collected to the driver, never released as such): the histograms of distinct items and
    of category events per user (clamped), and the funnel (users with an event of each type)."""

    items: dict[int, int]  # {c: users with c distinct items}, c >= 1
    category_events: dict[int, int]  # {c: users with c events in (public) categories}, c >= 1
    funnel: dict[str, int]  # event type -> users with such an event (of an item)


def user_summary(silver: "DataFrame", params: DPStatsParams, item_cap: int, event_cap: int,
                 catalog: "DataFrame | None" = None) -> UserSummary:
    """``items_per_user_histogram``, ``category_events_per_user_histogram`` and the funnel of
    ``bounded_aggregates`` (a user counts once per event type it has, on an item) in one job:
    one groupBy user, then one groupBy of the (clamped) pair of counts."""
    from pyspark.sql import functions as F

    if catalog is not None:
        silver = catalog_events(silver, catalog)
    item_ok = F.col(ITEM).isNotNull()
    category_ok = F.col(CATEGORY).isNotNull()
    if params.public_categories:
        category_ok = category_ok & F.col(CATEGORY).isin(list(params.public_categories))
    per_user = silver.where(F.col(USER).isNotNull()).groupBy(USER).agg(
        F.least(F.countDistinct(F.when(item_ok, F.col(ITEM))), F.lit(item_cap)).alias("ci"),
        F.least(F.count(F.when(category_ok, 1)), F.lit(event_cap)).alias("ce"),
        *[F.max(F.when(item_ok & (F.col("event_type") == t), 1).otherwise(0)).alias(f"has_{t}")
          for t in EVENT_TYPES])
    rows = per_user.groupBy("ci", "ce").agg(F.count(F.lit(1)).alias("n"),
                                            *[F.sum(f"has_{t}").alias(t) for t in EVENT_TYPES]).collect()
    items: dict[int, int] = {}
    events: dict[int, int] = {}
    funnel = {t: 0 for t in EVENT_TYPES}
    for r in rows:
        if r["ci"]:
            items[int(r["ci"])] = items.get(int(r["ci"]), 0) + int(r["n"])
        if r["ce"]:
            events[int(r["ce"])] = events.get(int(r["ce"]), 0) + int(r["n"])
        for t in EVENT_TYPES:
            funnel[t] += int(r[t] or 0)
    return UserSummary(items, events, funnel)


def category_events_per_user_histogram(silver: "DataFrame", params: DPStatsParams, cap: int,
                                       catalog: "DataFrame | None" = None) -> dict[int, int]:
    """{c: number of users with c events in (public) categories (c clamped to ``cap``)}, over
    the events that category bounding sees: to choose T; collected, never released."""
    from pyspark.sql import functions as F

    if catalog is not None:
        silver = catalog_events(silver, catalog)
    return _histogram(_category_events(silver, params).groupBy(USER)
                      .agg(F.least(F.count(F.lit(1)), F.lit(cap)).alias("c")))
