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
| category_events     | events per category                         | Laplace             | L1 = Kc x Cc           |
| purchase_price_sum  | sum of clamped purchase prices, centred     | Laplace             | L1 = M x (hi - lo) / 2 |
| purchase_count      | purchases (denominator of the mean price)   | Laplace             | L1 = M                 |

(K = max_items_per_user, C = max_events_per_item, Kc = max_categories_per_user,
Cc = max_events_per_category, M = max_purchases_per_user, [lo, hi] the price clamp.)
The mean price is noisy sum / noisy count + midpoint (the normalized bounded mean of Google's
differential-privacy library, ``BoundedMean``): post-processing, no extra budget.

Basic composition over the statistics (Dwork & Roth 2014, Thm 3.16) makes the release
(sum of epsilons, sum of deltas)-DP; the ledger also composes the parts tightly (PLD).
A weight of 0 leaves a statistic out. With a catalog (public items and categories,
``public_items`` / ``public_categories``) the two selections are not run: their share of
epsilon goes to the other statistics and the release is pure epsilon-DP (delta 0).
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
COUNTS = ("item_users", "item_events", "funnel_users", "category_events", "purchase_price_sum", "purchase_count")
STATISTICS = (*SELECTIONS, *COUNTS)
NEEDS = {  # a statistic is released only for keys its selection kept
    "item_users": "item_selection", "item_events": "item_selection", "category_events": "category_selection",
}
# Selection gets the largest share: an item must clear its threshold (about K ln(K / delta) /
# epsilon users) to appear at all, while counts of kept items are large by construction.
DEFAULT_EPSILON_SPLIT = {
    "item_selection": 0.4, "item_users": 0.2, "item_events": 0.1, "funnel_users": 0.05,
    "category_selection": 0.1, "category_events": 0.05, "purchase_price_sum": 0.05, "purchase_count": 0.05,
}
DEFAULT_DELTA_SPLIT = {"item_selection": 0.8, "category_selection": 0.2}


@dataclass(frozen=True)
class StatisticBudget:
    """One statistic's share of the release and the noise it gets."""

    name: str
    mechanism: str  # "laplace" or "partition_selection"
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
        return Component("approx_dp", epsilon=self.epsilon, delta=self.delta, label=self.name)


@dataclass(frozen=True)
class DPStatsParams:
    """Budget and contribution bounds of one day's DP statistics. Errors name the field."""

    epsilon: float = 0.5
    """Epsilon of the whole release (one day of users)."""
    delta: float = 1e-8
    """Delta of the whole release (spent by partition selection only)."""
    max_items_per_user: int = 5
    """K: items a user contributes to (the user's most used ones; the rest are dropped)."""
    max_events_per_item: int = 5
    """C: events of one user counted per item (rarest event types are kept first)."""
    max_categories_per_user: int = 5
    max_events_per_category: int = 10
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
    epsilon_split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EPSILON_SPLIT))
    """Relative weights of the statistics in epsilon, over the defaults (normalized to sum to 1;
    0 leaves a statistic out)."""
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
        for name, known in (("epsilon_split", STATISTICS), ("delta_split", SELECTIONS)):
            weights = getattr(self, name)
            unknown = sorted(set(weights) - set(known))
            if unknown:
                fail(name, f"names unknown statistics {unknown} (known: {list(known)})")
            if any(not isinstance(w, int | float) or isinstance(w, bool) or not w >= 0 or not math.isfinite(w)
                   for w in weights.values()):
                fail(name, "must map statistics to non-negative numbers")
        # Weights given by the user replace those defaults they name.
        object.__setattr__(self, "epsilon_split", {**DEFAULT_EPSILON_SPLIT, **self.epsilon_split})
        object.__setattr__(self, "delta_split", {**DEFAULT_DELTA_SPLIT, **self.delta_split})
        eps = self.epsilon_split
        if sum(w for s, w in eps.items() if s in self.selections() or s not in SELECTIONS) <= 0:
            fail("epsilon_split", "must give a positive weight to at least one statistic")
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

    def sensitivity(self, statistic: str) -> float:
        k, c = self.max_items_per_user, self.max_events_per_item
        kc, cc = self.max_categories_per_user, self.max_events_per_category
        m = self.max_purchases_per_user
        return {
            "item_selection": k, "item_users": k, "item_events": k * c, "funnel_users": len(EVENT_TYPES),
            "category_selection": kc, "category_events": kc * cc,
            "purchase_price_sum": m * (self.price_upper - self.price_lower) / 2, "purchase_count": m,
        }[statistic]

    def selections(self) -> tuple[str, ...]:
        """The partition selections this release runs (public items and categories need none)."""
        public = {"item_selection": self.public_items, "category_selection": bool(self.public_categories)}
        return tuple(s for s in SELECTIONS if not public[s])

    def plan(self) -> dict[str, StatisticBudget]:
        """The statistics with a positive weight and their (epsilon, delta) shares."""
        weights = {s: w for s, w in self.epsilon_split.items()
                   if w > 0 and (s in self.selections() or s not in SELECTIONS)}
        eps_total = sum(weights.values())
        used = [s for s in STATISTICS if s in weights]
        selections = [s for s in SELECTIONS if s in used]
        delta_total = sum(self.delta_split.get(s, 0) for s in selections)
        plan = {}
        for name in used:
            selection = name in SELECTIONS
            plan[name] = StatisticBudget(
                name=name, mechanism="partition_selection" if selection else "laplace",
                epsilon=self.epsilon * weights[name] / eps_total,
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
