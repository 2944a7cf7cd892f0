"""The DP mechanisms of privrec's releases, from PyDP (Google's differential-privacy library).

- ``LaplaceNoise``: the Laplace mechanism (Dwork, McSherry, Nissim & Smith 2006; Dwork &
  Roth 2014, Def. 3.3 and Thm 3.6): a value of L1 sensitivity ``s`` plus noise of scale
  ``b = s / epsilon`` is epsilon-DP; the noise variance is ``2 b^2``. PyDP samples it with the
  library's secure (granularity-rounded, Mironov 2012) sampler, never with numpy.
- ``PartitionSelection``: which keys (items, categories) may appear in a release at all.
  A key contributed by few users must not be revealed by its presence. PyDP's strategies
  keep a key of ``n`` users with probability ``pi(n)``; for the truncated geometric strategy
  (Desfontaines, Voss, Gipson & Mandayam 2022, "Differentially private partition selection",
  PoPETs, Thm. 1) with per-key budget (epsilon', delta') = (epsilon / m, delta / m) for users
  contributing to at most ``m`` keys:

      pi(0) = 0,  pi(n) = min(e^eps' pi(n-1) + delta',
                              1 + e^-eps' (pi(n-1) + delta' - 1),  1)

  which is the largest keep probability an (epsilon, delta)-DP selection can have.

Both objects are created once per statistic and called once per value: the randomness is
drawn when the release is computed, and a release is computed once (the ledger reuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from privrec_pipeline.errors import ConfigurationError

SELECTION_STRATEGIES = ("truncated_geometric", "laplace", "gaussian")


@dataclass
class LaplaceNoise:
    """Laplace noise for values of L1 sensitivity ``sensitivity`` at ``epsilon``."""

    epsilon: float
    sensitivity: float
    confidence_level: float = 0.95
    _mechanism: Any = field(init=False, repr=False)
    _half_width: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not math.isfinite(self.epsilon):
            raise ConfigurationError(f"LaplaceNoise: epsilon must be positive and finite, not {self.epsilon}")
        if not self.sensitivity > 0 or not math.isfinite(self.sensitivity):
            raise ConfigurationError(f"LaplaceNoise: sensitivity must be positive and finite, not {self.sensitivity}")
        if not 0 < self.confidence_level < 1:
            raise ConfigurationError(f"LaplaceNoise: confidence_level must be in (0, 1), not {self.confidence_level}")
        from pydp.algorithms.numerical_mechanisms import LaplaceMechanism

        self._mechanism = LaplaceMechanism(self.epsilon, self.sensitivity)
        # PyDP's interval for the true value around a noised value; Laplace noise is
        # symmetric with a fixed scale, so one half-width serves every value.
        interval = self._mechanism.noise_confidence_interval(self.confidence_level, 0.0)
        self._half_width = (interval.upper_bound - interval.lower_bound) / 2

    @property
    def scale(self) -> float:
        """b = sensitivity / epsilon (PyDP's ``diversity``)."""
        return float(self._mechanism.diversity)

    @property
    def variance(self) -> float:
        return 2.0 * self.scale**2

    @property
    def half_width(self) -> float:
        """Half-width of the ``confidence_level`` interval of the true value around a noised one."""
        return self._half_width

    def count(self, value: int) -> int:
        """A noisy integer count (PyDP rounds the noised value to an integer)."""
        return int(self._mechanism.add_noise(int(value)))

    def sum(self, value: float) -> float:
        return float(self._mechanism.add_noise(float(value)))

    def describe(self) -> dict[str, Any]:
        return {"mechanism": "laplace", "epsilon": self.epsilon, "l1_sensitivity": self.sensitivity,
                "noise_scale": self.scale, "noise_stddev": math.sqrt(self.variance),
                "confidence_level": self.confidence_level, "ci_half_width": self.half_width,
                "library": "PyDP LaplaceMechanism"}


@dataclass
class PartitionSelection:
    """PyDP's (epsilon, delta) partition selection for users contributing to at most
    ``max_partitions`` keys."""

    epsilon: float
    delta: float
    max_partitions: int
    strategy: str = "truncated_geometric"
    _strategy: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not math.isfinite(self.epsilon):
            raise ConfigurationError(f"PartitionSelection: epsilon must be positive and finite, not {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigurationError(f"PartitionSelection: delta must be in (0, 1), not {self.delta}")
        if self.max_partitions < 1:
            raise ConfigurationError(f"PartitionSelection: max_partitions must be positive, not {self.max_partitions}")
        if self.strategy not in SELECTION_STRATEGIES:
            raise ConfigurationError(
                f"PartitionSelection: strategy must be one of {SELECTION_STRATEGIES}, not {self.strategy!r}")
        from pydp.algorithms.partition_selection import create_partition_strategy

        self._strategy = create_partition_strategy(self.strategy, self.epsilon, self.delta, self.max_partitions)

    def keep(self, users: int) -> bool:
        """Draw whether a key with ``users`` distinct (bounded) users is released."""
        return bool(self._strategy.should_keep(int(users)))

    def probability(self, users: int) -> float:
        """The strategy's keep probability for a key of ``users`` users."""
        return float(self._strategy.probability_of_keep(int(users)))

    def users_for(self, probability: float) -> int:
        """The fewest users a key needs to be kept with at least ``probability``."""
        lo, hi = 0, 1
        while self.probability(hi) < probability:
            lo, hi = hi, hi * 2
            if hi > 1 << 40:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.probability(mid) < probability else (lo, mid)
        return hi

    def describe(self) -> dict[str, Any]:
        return {"mechanism": "partition_selection", "strategy": self.strategy, "epsilon": self.epsilon,
                "delta": self.delta, "max_partitions_contributed": self.max_partitions,
                "users_for_half_keep": self.users_for(0.5), "users_for_95pct_keep": self.users_for(0.95),
                "library": "PyDP create_partition_strategy"}


def truncated_geometric_keep_probability(users: int, epsilon: float, delta: float, max_partitions: int) -> float:
    """pi(n) of the truncated geometric strategy (Desfontaines et al. 2022, Thm. 1), computed
    from the paper's recurrence; used to check PyDP's strategy, not to select."""
    eps, dlt = epsilon / max_partitions, delta / max_partitions
    pi = 0.0
    for _ in range(users):
        pi = min(math.exp(eps) * pi + dlt, 1 + math.exp(-eps) * (pi + dlt - 1), 1.0)
    return pi
