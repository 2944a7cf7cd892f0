"""Contribution bounds chosen from the data, privately, and the bias bounding leaves.

K (``max_items_per_user``) trades noise against bias: a larger K keeps more of each user's
items (less is dropped) but every item count gets noise of scale K / epsilon. With
``bounds="auto"`` K is chosen by the exponential mechanism (McSherry & Talwar 2007) over the
candidates 1..U (U = ``max_items_upper``), with the scoring function of PipelineDP's
private l0 bound (``pipeline_dp.private_contribution_bounds.L0ScoringFunction``; the same
approach as Tumult Analytics' bound selection, and Amin, Kulesza, Munoz & Vassilvitskii
2019, "Bounding user contributions: a bias-variance trade-off in differential privacy"):

    score(k) = -0.5 * P * std(k) - 0.5 * sum_u max(min(c_u, U) - k, 0)

with P the number of partitions (catalog items: public), std(k) = sqrt(2) k / epsilon_users
the standard deviation of one item's Laplace user count at K = k, and c_u the number of
distinct items of user u. Adding or removing one user changes every score by at most U in
the same direction (the score is monotonic), so PipelineDP's ``ExponentialMechanism``
samples k with probability proportional to exp(epsilon_select * score(k) / U): pure
epsilon_select-DP. The mechanism only needs P, the per-user histogram of c_u (capped),
computed in Spark, collected to the driver and never released.

The category statistic's bound T (events of one user over all public categories, its L1
sensitivity; PipelineDP's ``max_contributions``) is chosen the same way
(``choose_category_events``): the same score with P = the number of public categories,
std(t) = sqrt(2) t / epsilon_category_events, c_u = the user's events in public categories
(with Kc and Cc lifted, a total cap t drops exactly max(c_u - t, 0) of them) and U = Uc.

Without a catalog P (the number of candidate items) is itself private, so automatic bounds
require a catalog (``DPStatsParams`` with ``public_items``); see ``release.run_dp_stats``.

Caveats: PipelineDP samples with numpy's default generator (not a cryptographic one) and in
floating point (Mironov 2012's attacks apply to it as to any textbook implementation).

The bias: ``dropped(K) = sum_u max(min(c_u, B) - K, 0)`` (B = ``bias_cap``), the number of
(user, item) contributions bounding dropped, released with Laplace noise of sensitivity
B - K (one user changes it by at most that) as the ``bounding_bias`` statistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline_dp.dp_computations import ExponentialMechanism


def bias_cap(upper: int, k: int) -> int:
    """B: the per-user contribution count is clamped to B in the dropped count, so one user
    changes it by at most B - K (>= 1)."""
    return max(upper, k + 1)


def dropped_contributions(histogram: Mapping[int, int], k: int, cap: int) -> int:
    """sum_u max(min(c_u, cap) - k, 0) from the histogram {c: users with c distinct items}."""
    return sum(max(min(c, cap) - k, 0) * n for c, n in histogram.items())


class ContributionBoundScore(ExponentialMechanism.ScoringFunction):
    """PipelineDP's ``L0ScoringFunction`` score for a bound k (Laplace noise of sensitivity k on
    each of P public partitions), on a histogram {c: users with c contributions}. ``score`` returns the score minus the largest score
    over the candidates: the same distribution (the exponential mechanism normalizes, so a
    constant shift cancels) without exp() underflowing to 0 for every candidate on large days
    (PipelineDP's ``_calculate_probabilities`` does not shift)."""

    def __init__(self, histogram: Mapping[int, int], partitions: int, epsilon_users: float, upper: int):
        super().__init__()
        if partitions < 1 or upper < 1 or not epsilon_users > 0:
            raise ValueError(f"{type(self).__name__}: needs partitions >= 1, upper >= 1 and a positive epsilon")
        self.histogram = {int(c): int(n) for c, n in histogram.items()}
        self.partitions, self.epsilon_users, self.upper = partitions, epsilon_users, upper
        self._shift = max(self.raw_score(k) for k in self.candidates())

    def candidates(self) -> list[int]:
        return list(range(1, self.upper + 1))

    def noise_std(self, k: int) -> float:
        return math.sqrt(2) * k / self.epsilon_users

    def raw_score(self, k: int) -> float:
        """-0.5 P std(k) - 0.5 sum_u max(min(c_u, U) - k, 0) (PipelineDP's L0ScoringFunction.score)."""
        return -0.5 * self.partitions * self.noise_std(k) - 0.5 * dropped_contributions(self.histogram, k, self.upper)

    def score(self, k: int) -> float:
        return self.raw_score(k) - self._shift

    @property
    def global_sensitivity(self) -> float:
        # One user moves the dropped term by 0.5 * (min(c, U) - k) <= U; PipelineDP uses U too.
        return float(self.upper)

    @property
    def is_monotonic(self) -> bool:
        return True  # adding a user lowers (or keeps) every score: PipelineDP then uses eps / sensitivity


class ItemBoundScore(ContributionBoundScore):
    """K: c_u = distinct (catalog) items of user u, P = catalog items, epsilon of item_users."""


class CategoryEventsScore(ContributionBoundScore):
    """T: c_u = events of user u in public categories, P = public categories, epsilon of
    category_events (std(t) = sqrt(2) t / epsilon: Laplace of L1 sensitivity t)."""


@dataclass(frozen=True)
class ChosenBound:
    k: int
    epsilon: float
    description: dict[str, Any]


def selection_probabilities(score: ItemBoundScore, epsilon: float) -> list[float]:
    """The exponential mechanism's distribution over ``score.candidates()`` (PipelineDP's own)."""
    return [float(p) for p in ExponentialMechanism(score)._calculate_probabilities(epsilon, score.candidates())]


def _choose(score: ContributionBoundScore, epsilon_select: float) -> ChosenBound:
    k = int(ExponentialMechanism(score).apply(epsilon_select, score.candidates()))
    return ChosenBound(k, epsilon_select, {
        "mechanism": "exponential", "epsilon": epsilon_select, "delta": 0.0,
        "global_sensitivity": score.global_sensitivity, "candidates": [1, score.upper],
        "partitions": score.partitions, "library": "PipelineDP ExponentialMechanism (L0ScoringFunction score)"})


def choose_max_items(histogram: Mapping[int, int], partitions: int, epsilon_select: float, epsilon_users: float,
                     upper: int) -> ChosenBound:
    """K chosen by PipelineDP's exponential mechanism at ``epsilon_select`` (pure DP)."""
    return _choose(ItemBoundScore(histogram, partitions, epsilon_users, upper), epsilon_select)


def choose_category_events(histogram: Mapping[int, int], categories: int, epsilon_select: float,
                           epsilon_events: float, upper: int) -> ChosenBound:
    """T chosen by PipelineDP's exponential mechanism at ``epsilon_select`` (pure DP), from the
    histogram of events per user in public categories (clamped)."""
    return _choose(CategoryEventsScore(histogram, categories, epsilon_events, upper), epsilon_select)
