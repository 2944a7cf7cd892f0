"""Mechanisms of a release as serializable data, and their composition.

A release is a list of ``Component``s (each run ``count`` times on the same users):

- ``laplace``: Laplace noise of scale ``noise_multiplier`` x sensitivity (pure eps-DP,
  eps = 1 / noise_multiplier per run; Dwork & Roth 2014, Thm 3.6);
- ``gaussian``: Gaussian noise of standard deviation ``noise_multiplier`` x sensitivity,
  optionally on a Poisson sample of rate ``sampling_rate`` (DP-SGD steps);
- ``approx_dp``: any (epsilon, delta)-DP mechanism known only by its guarantee (e.g. PyDP's
  partition selection).

Composition is tight: privacy loss distributions (PLD; Meiser & Mohammadi 2018, Koskela et
al. 2020, Doroshenko et al. 2022, as implemented in Google's dp_accounting), composed and
read at the policy's delta. The PLDs use the pessimistic discretization, so the result is an
upper bound on the true epsilon. ``basic_composition`` (sum of epsilons and deltas, Dwork &
Roth 2014 Thm 3.16) is reported next to it. Components that dp_accounting knows as
``DpEvent``s are also given in that form (``to_dp_event``), so a reviewer can recompute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

from privrec_pipeline.errors import ConfigurationError

MECHANISMS = ("laplace", "gaussian", "approx_dp")
DISCRETIZATION = 1e-4  # PLD value discretization interval (dp_accounting's default)
LAPLACE_PLD_MAX_EPSILON = 20.0  # above: a Laplace component is accounted as pure (epsilon, 0)-DP


@dataclass(frozen=True)
class Component:
    mechanism: str
    count: int = 1
    noise_multiplier: float | None = None  # laplace, gaussian
    sampling_rate: float = 1.0  # gaussian
    epsilon: float | None = None  # approx_dp
    delta: float | None = None  # approx_dp
    label: str = ""  # what it releases, e.g. "item counts"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigurationError(f"unknown mechanism {self.mechanism!r}; known: {MECHANISMS}")
        if self.count < 1:
            raise ConfigurationError(f"{self.label or self.mechanism}: count must be >= 1")
        if self.mechanism in ("laplace", "gaussian"):
            if self.noise_multiplier is None or not self.noise_multiplier > 0:
                raise ConfigurationError(f"{self.label or self.mechanism}: noise_multiplier must be > 0")
        if not 0 < self.sampling_rate <= 1:
            raise ConfigurationError(f"{self.label or self.mechanism}: sampling_rate must be in (0, 1]")
        if self.mechanism == "approx_dp":
            if self.epsilon is None or self.epsilon < 0 or self.delta is None or not 0 <= self.delta < 1:
                raise ConfigurationError(f"{self.label or 'approx_dp'}: needs epsilon >= 0 and delta in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Component":
        return cls(**data)

    def pld(self) -> Any:
        from dp_accounting.pld import common
        from dp_accounting.pld import privacy_loss_distribution as pld

        if self.mechanism == "laplace" and 1.0 / self.noise_multiplier > LAPLACE_PLD_MAX_EPSILON:
            # dp_accounting's Laplace PLD fails numerically above epsilon ~25 at this
            # discretization ("deltas are not in non-increasing order"). A Laplace mechanism of
            # that epsilon is (epsilon, 0)-DP, and the PLD of (epsilon, 0) (randomized response)
            # dominates every (epsilon, 0)-DP mechanism's (Kairouz, Oh & Viswanath 2015): an
            # upper bound, exact enough where such an epsilon is spent.
            one = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(1.0 / self.noise_multiplier, 0.0),
                                              value_discretization_interval=DISCRETIZATION)
        elif self.mechanism == "laplace":
            one = pld.from_laplace_mechanism(self.noise_multiplier, value_discretization_interval=DISCRETIZATION)
        elif self.mechanism == "gaussian":
            one = pld.from_gaussian_mechanism(self.noise_multiplier, sampling_prob=self.sampling_rate,
                                              value_discretization_interval=DISCRETIZATION)
        else:
            one = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(self.epsilon, self.delta),
                                              value_discretization_interval=DISCRETIZATION)
        return one if self.count == 1 else one.self_compose(self.count)

    def to_dp_event(self) -> Any | None:
        """The dp_accounting DpEvent of this component (None for approx_dp: no such event in 0.4)."""
        from dp_accounting import dp_event

        if self.mechanism == "laplace":
            event = dp_event.LaplaceDpEvent(self.noise_multiplier)
        elif self.mechanism == "gaussian":
            event = dp_event.GaussianDpEvent(self.noise_multiplier)
            if self.sampling_rate < 1:
                event = dp_event.PoissonSampledDpEvent(self.sampling_rate, event)
        else:
            return None
        return event if self.count == 1 else dp_event.SelfComposedDpEvent(event, self.count)


def pure_epsilon(component: Component) -> tuple[float, float]:
    """(epsilon, delta) of one component by itself at delta 0 where it is pure DP."""
    if component.mechanism == "laplace":
        return component.count / component.noise_multiplier, 0.0
    if component.mechanism == "approx_dp":
        return component.count * component.epsilon, component.count * component.delta
    return math.inf, 0.0  # Gaussian: no pure guarantee; use epsilon_at


def grouped(components: list[Component]) -> list[Component]:
    """Equal mechanisms merged into one component with the summed count (labels dropped).

    Composition is commutative, so this is the same composition; it lets a ledger of years of
    daily releases (a few distinct mechanisms, thousands of components) self-compose each
    distinct PLD once instead of convolving thousands of them."""
    counts: dict[tuple, int] = {}
    for c in components:
        key = (c.mechanism, c.noise_multiplier, c.sampling_rate, c.epsilon, c.delta)
        counts[key] = counts.get(key, 0) + c.count
    return [Component(m, count=n, noise_multiplier=nm, sampling_rate=q, epsilon=e, delta=d)
            for (m, nm, q, e, d), n in counts.items()]


def composed_epsilon(components: list[Component], delta: float) -> float:
    """Tight epsilon of the composition of ``components`` at ``delta`` (PLD)."""
    if not components:
        return 0.0
    composed = reduce(lambda a, b: a.compose(b), (c.pld() for c in grouped(components)))
    return float(composed.get_epsilon_for_delta(delta))


def release_guarantee(components: list[Component], delta: float) -> tuple[float, float]:
    """The (epsilon, delta) a release states for itself: tight epsilon at ``delta`` (or its
    pure epsilon when every component is pure, then delta 0)."""
    if all(c.mechanism == "laplace" or (c.mechanism == "approx_dp" and c.delta == 0) for c in components):
        return sum(pure_epsilon(c)[0] for c in components), 0.0
    return composed_epsilon(components, delta), delta


def basic_composition(guarantees: list[tuple[float, float]]) -> tuple[float, float]:
    """Sum of epsilons and of deltas (Dwork & Roth 2014, Thm 3.16)."""
    return sum(e for e, _ in guarantees), sum(d for _, d in guarantees)
