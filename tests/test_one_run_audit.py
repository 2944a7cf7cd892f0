"""The one-run audit's statistics (``privacy.one_run_audit``, Steinke, Nasr & Jagielski 2023):
the p-value and the bound by hand, canaries from an exactly epsilon-DP mechanism never refute
epsilon (at the stated confidence) yet give an informative bound, and perfect guesses give the
largest bound the canary count allows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from privrec_pipeline.privacy.one_run_audit import GUESS_SHARES, audit, epsilon_lower, p_value


def test_the_p_value_is_the_binomial_tail_plus_the_delta_term():
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 40, 30, 1.0) == pytest.approx(binom.sf(29, 40, q))
    # delta > 0 adds 2 m delta alpha, alpha = max_i P[v > Binomial >= v - i] / i (Theorem 5.2).
    alpha = max(sum(binom.pmf(30 - j, 40, q) for j in range(1, i + 1)) / i for i in range(1, 31))
    assert p_value(100, 40, 30, 1.0, 1e-3) == pytest.approx(binom.sf(29, 40, q) + 2 * 100 * 1e-3 * alpha)
    assert p_value(100, 40, 30, 1.0, 1e-3) > p_value(100, 40, 30, 1.0)
    with pytest.raises(ValueError, match="correct"):
        p_value(10, 5, 6, 1.0)


def test_all_guesses_right_give_the_closed_form_bound():
    # p-value q^r at delta 0: the bound is the logit of significance^(1/r).
    r, significance = 50, 0.01
    q = significance ** (1 / r)
    assert epsilon_lower(1000, r, r, 0.0, significance) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert epsilon_lower(1000, r, r // 2, 0.0, significance) == 0.0  # chance level: no evidence


def _randomized_response(m: int, epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canaries through an exactly epsilon-DP mechanism: each score reports the inclusion bit
    with probability e^eps / (1 + e^eps), and a continuous part independent of it."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-epsilon))
    reported = np.where(truthful, included, ~included)
    return reported + rng.random(m) * 0.5, included


def test_an_epsilon_dp_mechanism_is_not_refuted_and_the_bound_is_informative():
    epsilon, confidence = 2.0, 0.95
    bounds = [audit(*_randomized_response(2000, epsilon, seed), epsilon, 0.0, confidence).epsilon_lower
              for seed in range(40)]
    # At most 5% of the runs may refute a correct claim; 40 runs: allow a few (expected ~0).
    assert sum(b > epsilon for b in bounds) <= 2, bounds
    assert np.median(bounds) > 0.5 * epsilon  # the audit has power: 2,000 canaries get near the claim


def test_perfect_guesses_refute_a_small_claim_and_bad_input_is_refused():
    included = np.arange(500) % 2 == 0
    result = audit(included.astype(float), included, 1.0, 1e-6, 0.99)
    assert not result.passed and result.epsilon_lower > 2.5 and result.correct == result.guesses
    assert result.guesses in {max(1, int(s * 500)) * f for s in GUESS_SHARES for f in (1, 2)}
    assert set(result.to_dict()) == {"claimed_epsilon", "delta", "epsilon_lower", "confidence", "canaries", "guesses",
                                     "correct", "method", "passed"}
    with pytest.raises(ValueError, match="at least 20 canaries"):
        audit(np.zeros(10), np.zeros(10, bool), 1.0, 0.0)
    with pytest.raises(ValueError, match="one inclusion bit per score"):
        audit(np.zeros(30), np.zeros(31, bool), 1.0, 0.0)
