"""An empirical lower bound on a training run's epsilon from canaries in that one run.

Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS;
arXiv:2305.08846): m canaries, each included in the run independently with probability 1/2
(S_c in {in, out}); after the run an auditor who sees only the run's output scores every
canary and guesses "in" for some, "out" for some and abstains on the rest. If the run is
(epsilon, delta)-DP, the number W of correct guesses among r guesses satisfies, for every v,

    P[W >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha,
    alpha = max_{i = 1..v} P[v > Binomial(r, e^eps / (1 + e^eps)) >= v - i] / i

(the paper's Theorem 5.2 and Algorithm 2; with delta = 0 it is Theorem 3.1). So observing v
correct guesses refutes every epsilon whose p-value is below 1 - confidence: the largest such
epsilon is a lower bound on the true epsilon at that confidence.

The guesses: the top k scores are guessed "in" (and, for the symmetric candidates, the bottom
k "out"), for a few fixed k; the bound is the best over those candidates, each tested at
(1 - confidence) / candidates (Bonferroni), so choosing the best after seeing the scores keeps
the stated confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

METHOD = ("one-run audit with Dirac canaries (Steinke, Nasr & Jagielski 2023, Theorem 5.2; "
          "Bonferroni over the guess counts)")
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2)
"""k as shares of the canaries; each gives two candidates: top k "in", and top k "in" + bottom k "out"."""


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least ``correct`` of ``guesses`` right] under the (epsilon, delta)-DP null hypothesis
    (Steinke et al. 2023, Theorem 5.2 / Algorithm 2)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    # alpha = max_i P[v > Binomial >= v - i] / i: cumulative pmf below v, divided by i.
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * alpha, 1.0)


def epsilon_lower(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest epsilon whose p-value is below ``significance`` (0 if none): bisection, as
    the p-value grows with epsilon."""
    if p_value(canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) < significance:
        low, high = high, high * 2
        if high > 1e3:
            return math.inf  # a correct-guess count no finite epsilon explains
    for _ in range(50):
        middle = (low + high) / 2
        if p_value(canaries, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float
    delta: float
    epsilon_lower: float
    confidence: float
    canaries: int
    guesses: int  # of the candidate the bound comes from
    correct: int
    method: str = METHOD

    @property
    def passed(self) -> bool:
        """The run shows no evidence, at ``confidence``, against its claimed (epsilon, delta)."""
        return self.epsilon_lower <= self.claimed_epsilon

    def to_dict(self) -> dict[str, object]:
        return {"claimed_epsilon": self.claimed_epsilon, "delta": self.delta, "epsilon_lower": self.epsilon_lower,
                "confidence": self.confidence, "canaries": self.canaries, "guesses": self.guesses,
                "correct": self.correct, "method": self.method, "passed": self.passed}


def audit(scores: np.ndarray, included: np.ndarray, claimed_epsilon: float, delta: float,
          confidence: float = 0.99) -> AuditResult:
    """The bound from the canaries' scores (higher: more likely "in") and their inclusion."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = scores.size
    if m != included.size or m < 20:
        raise ValueError(f"the audit needs one inclusion bit per score and at least 20 canaries, got {m} scores "
                         f"and {included.size} bits")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    # Ties are broken by canary index (a fixed order, independent of the inclusion bits).
    order = np.lexsort((np.arange(m), -scores))
    ks = sorted({max(1, int(share * m)) for share in GUESS_SHARES})
    candidates = [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]
    significance = (1 - confidence) / len(candidates)
    best = AuditResult(claimed_epsilon, delta, 0.0, confidence, m, 0, 0)
    for top, bottom in candidates:
        correct = int(included[order[:top]].sum()) + (int((~included[order[m - bottom:]]).sum()) if bottom else 0)
        bound = epsilon_lower(m, top + bottom, correct, delta, significance)
        if bound > best.epsilon_lower:
            best = AuditResult(claimed_epsilon, delta, bound, confidence, m, top + bottom, correct)
    return best
