"""Empirical lower bounds on epsilon from runs of a mechanism on neighbouring datasets.

A statistical tester in the spirit of Google's DP stochastic tester and DP-Auditorium (Kong
et al. 2024), following Ding, Wang, Wang, Zhang & Kifer 2018 ("Detecting violations of
differential privacy", CCS): run the mechanism ``n`` times on a dataset D and ``n`` times on a
neighbour D' (one user added with all of their contributions), then

1. on the first half of the runs, choose the event S = {output_j > t} or {output_j <= t}
   (coordinate j, threshold t from the pooled quantiles, and the direction D vs D' or D' vs D)
   whose bound (below) on that half is largest; besides the outputs themselves, one more
   coordinate: the sum of the outputs whose mean moved between D and D' (by more than four
   standard errors on that half) with the sign of the move, the test that sees a user who
   moves several outputs at once (a contribution bound that does not bind);
2. on the second half (independent of the choice), bound p = P[M(D) in S] from below and
   q = P[M(D') in S] from above with Clopper-Pearson intervals, each at confidence
   1 - alpha / 2.

If M is (epsilon, delta)-DP then p <= e^epsilon q + delta for every S, so with probability at
least 1 - alpha, epsilon >= ln((p_low - delta) / q_high): a lower bound on the true epsilon
(``epsilon_lower`` above the claimed epsilon refutes the claim at that confidence). A correct
mechanism gives a bound below its epsilon; a bound near it needs many runs (the price of the
confidence interval), so tests use mechanisms and neighbours where a broken one (sensitivity
halved, bounding skipped) moves the bound far above the claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta


@dataclass(frozen=True)
class LowerBound:
    epsilon_lower: float  # 0 when no event shows any evidence
    confidence: float
    claimed_epsilon: float
    delta: float
    runs: int  # per dataset
    event: str  # the event the bound comes from
    method: str = ("Clopper-Pearson bounds on one event chosen on held-out runs (Ding et al. 2018; "
                   "DP-Auditorium)")

    @property
    def refutes(self) -> bool:
        """The runs show, at ``confidence``, that the mechanism is not (claimed epsilon, delta)-DP."""
        return self.epsilon_lower > self.claimed_epsilon

    def to_dict(self) -> dict[str, object]:
        return {"claimed_epsilon": self.claimed_epsilon, "delta": self.delta, "epsilon_lower": self.epsilon_lower,
                "confidence": self.confidence, "runs": self.runs, "event": self.event, "method": self.method,
                "refutes": self.refutes}


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The two one-sided (1 - alpha) Clopper-Pearson bounds of a binomial proportion."""
    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return low, high


def _rate(samples: np.ndarray, event: tuple[int, float, bool]) -> np.ndarray:
    j, t, above = event
    return samples[:, j] > t if above else samples[:, j] <= t


def _best_event(choose_a: np.ndarray, choose_b: np.ndarray, thresholds: int, delta: float,
                alpha: float) -> tuple[tuple[int, float, bool], str]:
    """The event (coordinate j, threshold t from the pooled quantiles, above or at most) and
    direction whose Clopper-Pearson bound on the choosing half is largest; all candidates at
    once (vectorized), in chunks of coordinates. Ties go to the first in (j, t, above first,
    D vs D' first) order."""
    half = len(choose_a)
    levels = np.linspace(0.02, 0.98, thresholds)
    best, best_score = None, -math.inf
    chunk = max(1, 2_000_000 // max(1, half * thresholds))
    for start in range(0, choose_a.shape[1], chunk):
        a, b = choose_a[:, start:start + chunk], choose_b[:, start:start + chunk]
        cuts = np.quantile(np.concatenate([a, b]), levels, axis=0)  # [thresholds, k]
        ka = (a[:, None, :] > cuts[None]).sum(0)  # runs above each cut, [thresholds, k]
        kb = (b[:, None, :] > cuts[None]).sum(0)
        # counts[j, t, above?, direction]: (kp, kq) for "D vs D'" and "D' vs D", above then at most.
        kp = np.stack([np.stack([ka, kb], -1), np.stack([half - ka, half - kb], -1)], -2).transpose(1, 0, 2, 3)
        kq = np.stack([np.stack([kb, ka], -1), np.stack([half - kb, half - ka], -1)], -2).transpose(1, 0, 2, 3)
        p_low = np.where(kp == 0, 0.0, beta.ppf(alpha, np.maximum(kp, 1), half - kp + 1))
        q_high = np.where(kq == half, 1.0, beta.ppf(1 - alpha, kq + 1, np.maximum(half - kq, 1)))
        scores = np.log(np.maximum(p_low - delta, 1e-300) / q_high)
        index = int(np.argmax(scores))
        if scores.flat[index] > best_score:
            j, t, below, direction = np.unravel_index(index, scores.shape)
            best_score = float(scores.flat[index])
            best = ((start + int(j), float(cuts[t, j]), not below), ("D vs D'", "D' vs D")[direction])
    return best


def epsilon_lower_bound(on_d: np.ndarray, on_neighbour: np.ndarray, claimed_epsilon: float, delta: float = 0.0,
                        confidence: float = 0.95, thresholds: int = 25) -> LowerBound:
    """The lower bound from ``n`` outputs on D and ``n`` on D' (arrays [n] or [n, k])."""
    a = np.asarray(on_d, dtype=float).reshape(len(on_d), -1)
    b = np.asarray(on_neighbour, dtype=float).reshape(len(on_neighbour), -1)
    if len(a) != len(b) or len(a) < 20 or a.shape[1] != b.shape[1]:
        raise ValueError(f"epsilon_lower_bound needs as many runs (>= 20) of the same shape on both datasets, got "
                         f"{a.shape} and {b.shape}")
    half = len(a) // 2
    choose_a, test_a, choose_b, test_b = a[:half], a[half:], b[:half], b[half:]
    moved = choose_b.mean(0) - choose_a.mean(0)
    stderr = np.sqrt((choose_a.var(0) + choose_b.var(0)) / half)
    weights = np.sign(moved) * (np.abs(moved) > 4 * stderr)
    if np.count_nonzero(weights) > 1:  # the projection on the moved outputs, as one more coordinate
        choose_a, test_a, choose_b, test_b = (np.column_stack([x, x @ weights])
                                              for x in (choose_a, test_a, choose_b, test_b))
    alpha = (1 - confidence) / 2
    # Each candidate is scored by the bound it would give on the choosing half (the same
    # Clopper-Pearson bounds), not by its raw ratio: a raw ratio favours far tails whose few
    # runs give a weak bound on the other half.
    (j, t, above), direction = _best_event(choose_a, choose_b, thresholds, delta, alpha)
    first, second = (test_a, test_b) if direction == "D vs D'" else (test_b, test_a)
    n = len(test_a)
    p_low, _ = clopper_pearson(int(_rate(first, (j, t, above)).sum()), n, alpha)
    _, q_high = clopper_pearson(int(_rate(second, (j, t, above)).sum()), n, alpha)
    lower = math.log((p_low - delta) / q_high) if p_low > delta and q_high > 0 else 0.0
    event = f"output[{j}] {'>' if above else '<='} {t:.6g}, {direction}"
    return LowerBound(max(lower, 0.0), confidence, claimed_epsilon, delta, len(a), event)


def audit(mechanism: Callable[[object], np.ndarray], dataset: object, neighbour: object, runs: int,
          claimed_epsilon: float, delta: float = 0.0, confidence: float = 0.95) -> LowerBound:
    """Run ``mechanism`` ``runs`` times on each dataset and bound its epsilon from below."""
    on_d = np.array([np.ravel(mechanism(dataset)) for _ in range(runs)])
    on_neighbour = np.array([np.ravel(mechanism(neighbour)) for _ in range(runs)])
    return epsilon_lower_bound(on_d, on_neighbour, claimed_epsilon, delta, confidence)
