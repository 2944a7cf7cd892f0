"""Contribution bounds chosen from the data, privately, and the bias bounding leaves.

K (``max_items_per_user``) trades noise against bias: a larger K keeps more of each user's
items (less is dropped) but every item count gets noise of scale K / epsilon.

The DP statistics (``bounds="auto"``) choose K as a DP quantile of the users' distinct item
counts c_u (the median by default), with the exponential mechanism (McSherry & Talwar 2007)
over the candidates 1..U (U = ``max_items_upper``) and the rank score of Smith 2011 ("Privacy-
preserving statistical estimation with optimal convergence rates"; the quantile mechanism of
Gillenwater, Joseph & Kulesza 2021, "Differentially private quantiles", and of Tumult
Analytics' bound choice):

    score(k) = -dist(q N, [#{u : c_u < k}, #{u : c_u <= k}]),   N = the number of users

(0 when the q-quantile's rank falls on k's users, else the distance to them; counts above U
count as U, so a day where most users exceed U gets K = U). One user added or removed moves
each end of the interval by at most 1 and q N by q, so the score's sensitivity is 1 (not
monotonic): PipelineDP's ``ExponentialMechanism`` samples k with
probability proportional to exp(epsilon_select * score(k) / 2). The category bound T is chosen
the same way from the users' event counts in public categories (``QuantileScore`` on that
histogram). Why a quantile: the release scales contributions (``dp_stats.bounding``) and
divides the counts by the kept share, so a bound costs little bias, and the noise of an
estimate, K / (kept share) / epsilon, grows with K; the median keeps half of the users whole.

The popularity baseline's K (``training.evaluation``, a ranking of bounded counts with no such
division) is chosen with the scoring function of PipelineDP's private l0 bound
(``pipeline_dp.private_contribution_bounds.L0ScoringFunction``; Amin, Kulesza, Munoz &
Vassilvitskii 2019, "Bounding user contributions: a bias-variance trade-off in differential
privacy"):

    score(k) = -0.5 * P * std(k) - 0.5 * sum_u max(min(c_u, U) - k, 0)

with P the number of partitions (catalog items: public), std(k) = sqrt(2) k / epsilon_users
the standard deviation of one item's Laplace user count at K = k, and c_u the number of
distinct items of user u. Adding or removing one user changes every score by at most U in
the same direction (the score is monotonic), so PipelineDP's ``ExponentialMechanism``
samples k with probability proportional to exp(epsilon_select * score(k) / U): pure
epsilon_select-DP. The mechanism only needs P, the per-user histogram of c_u (capped),
computed in Spark, collected to the driver and never released.

Automatic bounds in the DP statistics require a catalog (``DPStatsParams`` with
``public_items``); see ``release.run_dp_stats``.

Caveats: PipelineDP samples with numpy's default generator (not a cryptographic one) and in
floating point (Mironov 2012's attacks apply to it as to any textbook implementation).

The bias: ``dropped(K) = sum_u max(min(c_u, B) - K, 0)`` (B = ``bias_cap``), the number of
(user, item) contributions bounding dropped, released with Laplace noise of sensitivity
B - K (one user changes it by at most that) as the ``bounding_bias`` statistic; the category
events dropped by L, the same way with B = Bc, as ``category_bias``.
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


class QuantileScore(ExponentialMechanism.ScoringFunction):
    """The rank score of the q-quantile over the candidates 1..``upper`` on a histogram
    {c: users with c contributions} (c clamped to ``upper``): minus the distance of q N to
    [#{c_u < k}, #{c_u <= k}] (sensitivity 1), shifted by its maximum like
    ``ContributionBoundScore`` (the same distribution, no underflow)."""

    def __init__(self, histogram: Mapping[int, int], quantile: float, upper: int):
        super().__init__()
        if not 0 < quantile < 1 or upper < 1:
            raise ValueError(f"{type(self).__name__}: needs 0 < quantile < 1 and upper >= 1")
        self.histogram = {int(c): int(n) for c, n in histogram.items()}
        self.quantile, self.upper = quantile, upper
        clamped: dict[int, int] = {}
        for c, n in self.histogram.items():
            clamped[min(c, upper)] = clamped.get(min(c, upper), 0) + n
        self._users = sum(clamped.values())
        self._ranks = {}  # k -> (#{c_u < k}, #{c_u <= k})
        below = sum(n for c, n in clamped.items() if c < 1)
        for k in self.candidates():
            self._ranks[k] = (below, below + clamped.get(k, 0))
            below += clamped.get(k, 0)
        self._shift = max(self.raw_score(k) for k in self.candidates())

    def candidates(self) -> list[int]:
        return list(range(1, self.upper + 1))

    def raw_score(self, k: int) -> float:
        below, at_most = self._ranks[k]
        rank = self.quantile * self._users
        return -max(below - rank, rank - at_most, 0.0)

    def score(self, k: int) -> float:
        return self.raw_score(k) - self._shift

    @property
    def global_sensitivity(self) -> float:
        return 1.0

    @property
    def is_monotonic(self) -> bool:
        return False  # adding a user raises the rank of some k and lowers q N's distance to others


@dataclass(frozen=True)
class ChosenBound:
    k: int
    epsilon: float
    description: dict[str, Any]


def selection_probabilities(score: ContributionBoundScore | QuantileScore, epsilon: float) -> list[float]:
    """The exponential mechanism's distribution over ``score.candidates()`` (PipelineDP's own)."""
    return [float(p) for p in ExponentialMechanism(score)._calculate_probabilities(epsilon, score.candidates())]


def _choose(score: ContributionBoundScore | QuantileScore, epsilon_select: float) -> ChosenBound:
    k = int(ExponentialMechanism(score).apply(epsilon_select, score.candidates()))
    description = {"mechanism": "exponential", "epsilon": epsilon_select, "delta": 0.0,
                   "global_sensitivity": score.global_sensitivity, "candidates": [1, score.upper]}
    if isinstance(score, QuantileScore):
        description.update(quantile=score.quantile,
                           library="PipelineDP ExponentialMechanism (DP quantile, rank score)")
    else:
        description.update(partitions=score.partitions,
                           library="PipelineDP ExponentialMechanism (L0ScoringFunction score)")
    return ChosenBound(k, epsilon_select, description)


def choose_max_items(histogram: Mapping[int, int], partitions: int, epsilon_select: float, epsilon_users: float,
                     upper: int) -> ChosenBound:
    """K chosen by PipelineDP's exponential mechanism at ``epsilon_select`` (pure DP)."""
    return _choose(ItemBoundScore(histogram, partitions, epsilon_users, upper), epsilon_select)


def choose_quantile(histogram: Mapping[int, int], quantile: float, epsilon_select: float, upper: int) -> ChosenBound:
    """A bound in 1..``upper``: the DP ``quantile`` of the per-user counts in ``histogram``
    (clamped counts; users above ``upper`` rank above every candidate), by PipelineDP's
    exponential mechanism at ``epsilon_select`` (pure DP)."""
    return _choose(QuantileScore(histogram, quantile, upper), epsilon_select)
