"""Parameters of the daily DP statistics release and how its budget is split.

A release is one (epsilon, delta) for one day of users, split explicitly across its
statistics (PipelineDP's two-phase budget: declare every statistic, split, then compute).
Every statistic is computed on contributions bounded per user, so each has a known
sensitivity (the amount one user can change it):

| statistic           | what                                        | mechanism           | sensitivity            |
|---------------------|---------------------------------------------|---------------------|------------------------|
| item_selection      | which items appear (the DP item vocabulary) | partition selection | l0 = K items           |
| item_users          | distinct users per item                     | Laplace             | L1 = K                 |
| item_events         | events per item and event type              | Laplace             | L1 = K x C             |
| funnel_users        | distinct users per event type (public keys) | Laplace             | L1 = #event types      |
| category_selection  | which categories appear                     | partition selection | l0 = Kc categories     |
| category_events     | events per category                         | Laplace             | L1 = min(Kc x Cc, T)   |
| purchase_price_sum  | sum of clamped purchase prices, centred     | Laplace             | L1 = M x (hi - lo) / 2 |
| purchase_count      | purchases (denominator of the mean price)   | Laplace             | L1 = M                 |
| bounding_bias       | (user, item) contributions dropped by K     | Laplace             | L1 = B - K             |
| category_bias       | category events dropped by L (public keys)  | Laplace             | L1 = Bc - L            |
| item_bounds         | K itself, when the bounds are chosen        | exponential         | 1 (rank score)         |
| category_bounds     | T itself, when the bounds are chosen        | exponential         | 1 (rank score)         |

(K = max_items_per_user, C = max_events_per_item, Kc = max_categories_per_user,
Cc = max_events_per_category, T = max_category_events_per_user (events of one user over all
categories; unset: Kc x Cc), M = max_purchases_per_user, [lo, hi] the price clamp,
U = max_items_upper, Uc = max_category_events_upper, B = max(U, K + 1) the clamp of a user's
item count in the dropped count, L = the category statistic's L1 bound, Bc = max(Uc, L + 1).)

Bounding. With partition selection (no catalog) a user's contributions are truncated: its K
most used items, Kc categories (partition selection needs each user in at most K keys). With
public keys (a catalog) they are scaled instead: a user with n items counts min(1, K / n) for
each of them, a user with e events in public categories min(1, L / e) per event, so every
user's L1 contribution is at most K (L) and nobody's items are dropped outright (L1 clipping
of the user's contribution vector; Amin, Kulesza, Munoz Medina & Vassilvitskii 2019,
"Bounding user contributions: a bias-variance trade-off in differential privacy", Sec. 3).
The share of contributions dropped by bounding (the bias, reported beside the noise) is the
noisy dropped count over (noisy dropped + the sum of the noisy item user counts): post-processing.
Each noisy count is also released as an estimate of the unbounded count, divided by the kept
share (``users_estimate``, ``events_estimate``: post-processing). Scaling spreads what is
dropped over a user's items evenly, so the estimate's remaining bias is small where heavy
users' items look like everybody's (measured in ``benchmarks/dp_stats.py``).

Bounds: ``bounds="fixed"`` uses K (and Kc, Cc, T) as set. ``bounds="auto"`` (needs a catalog)
chooses K as a DP quantile (``bounds_quantile``, the median by default) of the users' distinct
item counts with the exponential mechanism (``dp_stats.bounds``) at ``bounds_epsilon_share`` x
epsilon (statistic ``item_bounds``, pure DP) and, with public categories, the category
statistic's L1 bound T the same way from the users' event counts at another
``bounds_epsilon_share`` x epsilon (``category_bounds``; Kc and Cc are then lifted, so T alone
bounds a user: L1 = T, PipelineDP's ``max_contributions``); the other statistics split the rest.
``bounds="auto_if_catalog"`` (the default) is "auto" when the release has a catalog (public
items) and "fixed" otherwise. With scaled bounds and the estimates, a small bound costs little
bias, and the noise of an estimate, (kept share)^-1 x K / epsilon, grows with K: the median
user's count is the default (measured in ``benchmarks/dp_stats.py``, BENCHMARKS.md).
The reserved description then says "auto" for the sensitivities that depend on K or T (their
ledger components, 1 / epsilon_i, do not).
The mean price is noisy sum / noisy count + midpoint (the normalized bounded mean of Google's
differential-privacy library, ``BoundedMean``): post-processing, no extra budget.

Basic composition over the statistics (Dwork & Roth 2014, Thm 3.16) makes the release
(sum of epsilons, sum of deltas)-DP; the ledger also composes the parts tightly (PLD).
A weight of 0 leaves a statistic out. With a catalog (public items and categories,
``public_items`` / ``public_categories``) the two selections are not run, the release is pure
epsilon-DP (delta 0) and the weights default to ``CATALOG_EPSILON_SPLIT``: the item user counts
(the popularity every consumer reads) get most of epsilon. ``category_bias`` needs public
categories (its dropped count comes from the scaled bound).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.privacy.accounting import Component
from privrec_pipeline.privacy.mechanisms import SELECTION_STRATEGIES
from privrec_pipeline.schema import EVENT_TYPES
from privrec_pipeline.settings import from_settings

SELECTIONS = ("item_selection", "category_selection")
COUNTS = ("item_users", "item_events", "funnel_users", "category_events", "purchase_price_sum", "purchase_count",
          "bounding_bias", "category_bias")
STATISTICS = (*SELECTIONS, *COUNTS)
ITEM_BOUNDS = "item_bounds"  # the exponential mechanism choosing K (chosen bounds), outside the split
CATEGORY_BOUNDS = "category_bounds"  # the exponential mechanism choosing T (chosen bounds), outside the split
BOUND_CHOICES = (ITEM_BOUNDS, CATEGORY_BOUNDS)
BOUNDS_MODES = ("fixed", "auto", "auto_if_catalog")
DEPENDS_ON_K = ("item_selection", "item_users", "item_events", "bounding_bias")
DEPENDS_ON_T = ("category_events", "category_bias")
NEEDS = {  # a statistic is released only for keys its selection kept
    "item_users": "item_selection", "item_events": "item_selection", "category_events": "category_selection",
}
# Selection gets the largest share: an item must clear its threshold (about K ln(K / delta) /
# epsilon users) to appear at all, while counts of kept items are large by construction.
DEFAULT_EPSILON_SPLIT = {
    "item_selection": 0.4, "item_users": 0.2, "item_events": 0.1, "funnel_users": 0.05,
    "category_selection": 0.1, "category_events": 0.05, "purchase_price_sum": 0.05, "purchase_count": 0.05,
    "bounding_bias": 0.02,
}
DEFAULT_DELTA_SPLIT = {"item_selection": 0.8, "category_selection": 0.2}
# With a catalog nothing is selected: item popularity (the statistic the training vocabulary,
# DP popularity and the report read) gets most of epsilon. On the demo day (epsilon 0.5,
# BENCHMARKS.md) this split is what brings the median error of the estimated user counts of
# items with >= 200 users under 10% and of the category event counts under 5%. (Categories
# are public with a catalog; set by hand without public categories, they are selected.)
CATALOG_EPSILON_SPLIT = {
    "item_selection": 0.0, "category_selection": 0.1,
    "item_users": 0.68, "item_events": 0.02, "funnel_users": 0.03, "category_events": 0.12,
    "purchase_price_sum": 0.025, "purchase_count": 0.025, "bounding_bias": 0.07, "category_bias": 0.03,
}


@dataclass(frozen=True)
class StatisticBudget:
    """One statistic's share of the release and the noise it gets."""

    name: str
    mechanism: str  # "laplace", "partition_selection" or "exponential"
    epsilon: float
    delta: float
    sensitivity: float  # L1 for Laplace; l0 (keys per user) for selection

    @property
    def noise_scale(self) -> float | None:
        return self.sensitivity / self.epsilon if self.mechanism == "laplace" else None

    def component(self) -> Component:
        """The ledger's description: Laplace with noise multiplier b / sensitivity = 1 / epsilon,
        or partition selection as an (epsilon, delta)-DP mechanism."""
        if self.mechanism == "laplace":
            return Component("laplace", noise_multiplier=1.0 / self.epsilon, label=self.name)
        # Partition selection, and the exponential mechanism (pure: delta 0).
        return Component("approx_dp", epsilon=self.epsilon, delta=self.delta, label=self.name)


@dataclass(frozen=True)
class DPStatsParams:
    """Budget and contribution bounds of one day's DP statistics. Errors name the field."""

    epsilon: float = 0.5
    """Epsilon of the whole release (one day of users)."""
    delta: float = 1e-8
    """Delta of the whole release (spent by partition selection only)."""
    max_items_per_user: int = 5
    """K: items a user contributes to (the user's most used ones; the rest are dropped). With
    chosen bounds it is chosen from the data instead (this value is then unused)."""
    bounds: str = "auto_if_catalog"
    """"fixed": K (Kc, Cc, T) as set; "auto": K and T chosen privately (exponential mechanism,
    needs a catalog); "auto_if_catalog": "auto" when the day has a catalog, else "fixed"."""
    bounds_epsilon_share: float = 0.03
    """Share of epsilon spent on choosing each bound (K, and T with public categories) when they
    are chosen."""
    bounds_quantile: float = 0.5
    """Chosen bounds: K (T) is this DP quantile of the users' distinct item (category event) counts."""
    max_items_upper: int = 100
    """U: the largest K "auto" may choose; also clamps a user's item count in the dropped count."""
    max_events_per_item: int = 5
    """C: events of one user counted per item (rarest event types are kept first)."""
    max_categories_per_user: int = 5
    max_events_per_category: int = 10
    max_category_events_per_user: int | None = None
    """T: events of one user counted over all categories together (the user's most used
    categories first); None: no total cap (L1 = Kc x Cc). Chosen from the data with chosen bounds."""
    max_category_events_upper: int = 100
    """Uc: the largest T chosen bounds may choose; also clamps a user's event count in its score."""
    max_purchases_per_user: int = 10
    """M: purchases of one user in the mean price."""
    price_lower: float = 0.0
    price_upper: float = 200.0
    """Purchase prices are clamped to [price_lower, price_upper] before summing."""
    public_categories: tuple[str, ...] = ()
    """A public list of categories (e.g. the catalog's): then categories need no selection, and
    events of other categories are not counted. Empty: categories go through partition selection."""
    use_catalog: bool = True
    """Use the day's item catalog (``privrec catalog``), when the lake has one, as the public keys of
    the release: every catalog item and category gets a noisy value and no partition selection
    (nor its delta) is needed; events of items outside the catalog are left out. False: keys
    are chosen by partition selection even with a catalog."""
    public_items: bool = False
    """Set by the release from the catalog (not a setting): the items are public keys."""
    selection_strategy: str = "truncated_geometric"
    """PyDP partition selection strategy: truncated_geometric, laplace or gaussian."""
    confidence_level: float = 0.95
    """Level of the confidence intervals written next to the noisy values."""
    epsilon_split: dict[str, float] = field(default_factory=dict)
    """Relative weights of the statistics in epsilon, over the defaults (``DEFAULT_EPSILON_SPLIT``,
    or ``CATALOG_EPSILON_SPLIT`` with public items; normalized to sum to 1; 0 leaves a statistic out)."""
    delta_split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DELTA_SPLIT))
    """Relative weights of the two partition selections in delta."""

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ConfigurationError(f"DPStatsParams: {name} {problem}, not {getattr(self, name)!r}")

        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            fail("epsilon", "must be positive and finite")
        if not 0 < self.delta < 1:
            fail("delta", "must be in (0, 1)")
        for name in ("max_items_per_user", "max_events_per_item", "max_categories_per_user",
                     "max_events_per_category", "max_purchases_per_user"):
            if getattr(self, name) < 1:
                fail(name, "must be positive")
        if not (math.isfinite(self.price_lower) and math.isfinite(self.price_upper)
                and self.price_lower < self.price_upper):
            fail("price_upper", f"must be finite and greater than price_lower ({self.price_lower})")
        if self.selection_strategy not in SELECTION_STRATEGIES:
            fail("selection_strategy", f"must be one of {SELECTION_STRATEGIES}")
        if not 0 < self.confidence_level < 1:
            fail("confidence_level", "must be in (0, 1)")
        if self.bounds not in BOUNDS_MODES:
            fail("bounds", f"must be one of {BOUNDS_MODES}")
        if not 0 < self.bounds_epsilon_share < 0.5:  # up to two choices come out of epsilon
            fail("bounds_epsilon_share", "must be in (0, 0.5)")
        if not 0 < self.bounds_quantile < 1:
            fail("bounds_quantile", "must be in (0, 1)")
        for name in ("max_items_upper", "max_category_events_upper"):
            if getattr(self, name) < 1:
                fail(name, "must be positive")
        if self.max_category_events_per_user is not None and not (
                isinstance(self.max_category_events_per_user, int) and not isinstance(self.max_category_events_per_user,
                                                                                        bool)
                and self.max_category_events_per_user >= 1):
            fail("max_category_events_per_user", "must be a positive integer or None")
        for name, known in (("epsilon_split", STATISTICS), ("delta_split", SELECTIONS)):
            weights = getattr(self, name)
            unknown = sorted(set(weights) - set(known))
            if unknown:
                fail(name, f"names unknown statistics {unknown} (known: {list(known)})")
            if any(not isinstance(w, int | float) or isinstance(w, bool) or not w >= 0 or not math.isfinite(w)
                   for w in weights.values()):
                fail(name, "must map statistics to non-negative numbers")
        # Weights given by the user replace those defaults they name (``weights``).
        object.__setattr__(self, "delta_split", {**DEFAULT_DELTA_SPLIT, **self.delta_split})
        eps = self.weights()
        if sum(w for s, w in eps.items() if s in self.selections() or s not in SELECTIONS) <= 0:
            fail("epsilon_split", "must give a positive weight to at least one statistic")
        if self.bounds == "auto" and eps.get("item_users", 0) <= 0:
            fail("bounds", "'auto' scores K by the noise of item_users, which needs a positive weight")
        for stat, selection in NEEDS.items():
            if selection not in self.selections():
                continue
            if eps.get(stat, 0) > 0 and eps.get(selection, 0) <= 0:
                fail("epsilon_split", f"gives {stat} a weight but not {selection}, which decides its keys")
        for selection in self.selections():
            if eps.get(selection, 0) > 0 and self.delta_split.get(selection, 0) <= 0:
                fail("delta_split", f"must give {selection} a positive weight (partition selection needs delta)")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "DPStatsParams":
        return from_settings(cls, settings, "DP statistics setting")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def weights(self) -> dict[str, float]:
        """The epsilon weights in use: the user's ``epsilon_split`` over the default split (the
        catalog's with public items)."""
        return {**(CATALOG_EPSILON_SPLIT if self.public_items else DEFAULT_EPSILON_SPLIT), **self.epsilon_split}

    def sensitivity(self, statistic: str) -> float:
        k, c = self.max_items_per_user, self.max_events_per_item
        kc = self.max_categories_per_user
        m = self.max_purchases_per_user
        return {
            "item_selection": k, "item_users": k, "item_events": k * c, "funnel_users": len(EVENT_TYPES),
            "category_selection": kc, "category_events": self.category_l1(),
            "purchase_price_sum": m * (self.price_upper - self.price_lower) / 2, "purchase_count": m,
            "bounding_bias": self.bias_cap() - k, "category_bias": self.category_bias_cap() - self.category_l1(),
            # The rank score of a DP quantile moves by at most 1 when one user is added or removed.
            ITEM_BOUNDS: 1, CATEGORY_BOUNDS: 1,
        }[statistic]

    def category_l1(self) -> int:
        """L1 of one user's category event counts: at most Kc categories of at most Cc events,
        and at most T in total (PipelineDP's max_partitions_contributed x
        max_contributions_per_partition, or its max_contributions)."""
        kc_cc = self.max_categories_per_user * self.max_events_per_category
        t = self.max_category_events_per_user
        return kc_cc if t is None else min(kc_cc, t)

    @property
    def auto_bounds(self) -> bool:
        """Whether the bounds are chosen from the data ("auto", or "auto_if_catalog" with public items)."""
        return self.bounds == "auto" or (self.bounds == "auto_if_catalog" and self.public_items)

    def bound_choices(self) -> tuple[str, ...]:
        """The bounds chosen by the exponential mechanism: K (item_bounds) when item_users is
        released, T (category_bounds) when category events over public categories are."""
        if not self.auto_bounds:
            return ()
        eps = self.weights()
        return tuple(name for name, needed in ((ITEM_BOUNDS, eps.get("item_users", 0) > 0),
                                               (CATEGORY_BOUNDS, bool(self.public_categories)
                                                and eps.get("category_events", 0) > 0)) if needed)

    def bias_cap(self) -> int:
        """B: a user's distinct items are clamped to B in the dropped count (sensitivity B - K)."""
        from privrec_pipeline.dp_stats.bounds import bias_cap

        return bias_cap(self.max_items_upper, self.max_items_per_user)

    def category_bias_cap(self) -> int:
        """Bc: a user's category events are clamped to Bc in the dropped count (sensitivity Bc - L)."""
        from privrec_pipeline.dp_stats.bounds import bias_cap

        return bias_cap(self.max_category_events_upper, self.category_l1())

    def selections(self) -> tuple[str, ...]:
        """The partition selections this release runs (public items and categories need none)."""
        public = {"item_selection": self.public_items, "category_selection": bool(self.public_categories)}
        return tuple(s for s in SELECTIONS if not public[s])

    def plan(self) -> dict[str, StatisticBudget]:
        """The statistics with a positive weight and their (epsilon, delta) shares."""
        weights = {s: w for s, w in self.weights().items()
                   if w > 0 and (s in self.selections() or s not in SELECTIONS)
                   and (s != "category_bias" or self.public_categories)}
        eps_total = sum(weights.values())
        # Chosen bounds: each choice (K, T) gets its share first, the statistics split the rest.
        choices = self.bound_choices()
        epsilon = self.epsilon * (1 - self.bounds_epsilon_share * len(choices))
        used = [s for s in STATISTICS if s in weights]
        selections = [s for s in SELECTIONS if s in used]
        delta_total = sum(self.delta_split.get(s, 0) for s in selections)
        plan = {}
        for choice in choices:
            plan[choice] = StatisticBudget(choice, "exponential", self.epsilon * self.bounds_epsilon_share,
                                           0.0, self.sensitivity(choice))
        for name in used:
            selection = name in SELECTIONS
            plan[name] = StatisticBudget(
                name=name, mechanism="partition_selection" if selection else "laplace",
                epsilon=epsilon * weights[name] / eps_total,
                delta=self.delta * self.delta_split[name] / delta_total if selection else 0.0,
                sensitivity=self.sensitivity(name),
            )
        return plan

    def components(self) -> list[Component]:
        return [b.component() for b in self.plan().values()]

    def spent(self) -> tuple[float, float]:
        """The release's own guarantee by basic composition of its statistics."""
        plan = self.plan().values()
        return sum(b.epsilon for b in plan), sum(b.delta for b in plan)
