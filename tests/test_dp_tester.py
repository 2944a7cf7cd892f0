"""The DP statistics tester (``privacy.dp_tester``): an empirical epsilon lower bound from runs
on neighbouring datasets. A correct mechanism is never refuted (its bound stays below the
claimed epsilon) and the bound is informative (close to it); a broken one (Laplace
sensitivity halved, contribution bounding skipped, partition selection without its
threshold) is refuted. The mechanisms are the pipeline's own (PyDP through
``privacy.mechanisms``). No Spark. Confidence 0.9999: a correct mechanism is refuted in at
most 1 of 10,000 runs of this file."""

from __future__ import annotations

import numpy as np
import pytest

from privrec_pipeline.privacy.dp_tester import audit, clopper_pearson, epsilon_lower_bound
from privrec_pipeline.privacy.mechanisms import LaplaceNoise, PartitionSelection

CONFIDENCE = 0.9999


def test_clopper_pearson_bounds_cover_the_proportion():
    low, high = clopper_pearson(50, 100, 0.025)
    assert 0.39 < low < 0.5 < high < 0.61
    assert clopper_pearson(0, 100, 0.025) == (0.0, pytest.approx(1 - 0.025 ** (1 / 100)))
    assert clopper_pearson(100, 100, 0.025)[1] == 1.0


def test_a_correct_laplace_count_is_not_refuted_and_its_bound_is_informative():
    noise = LaplaceNoise(1.0, 1.0)  # a count of sensitivity 1 at epsilon 1
    bound = audit(lambda n: noise.sum(float(n)), 100, 101, 20_000, claimed_epsilon=1.0, confidence=CONFIDENCE)
    assert not bound.refutes and 0.5 < bound.epsilon_lower <= 1.0
    assert bound.to_dict()["confidence"] == CONFIDENCE and "Clopper-Pearson" in bound.method


@pytest.mark.parametrize("broken, neighbour, runs", [
    (LaplaceNoise(1.0, 0.5), 101, 20_000),  # sensitivity halved: noise of a count of sensitivity 0.5
    (LaplaceNoise(1.0, 1.0), 103, 5_000),  # bounding skipped: the user moves the count by 3, not 1
], ids=["sensitivity halved", "bounding skipped"])
def test_a_broken_laplace_release_is_refuted(broken, neighbour, runs):
    bound = audit(lambda n: broken.sum(float(n)), 100, neighbour, runs, claimed_epsilon=1.0, confidence=CONFIDENCE)
    assert bound.refutes and bound.epsilon_lower > 1.2


def test_partition_selection_is_not_refuted_and_a_selection_without_threshold_is():
    # One user's item: absent without the user (never kept), kept with probability <= delta
    # with it ((epsilon, delta)-DP with l0 = 1).
    selection = PartitionSelection(1.0, 1e-3, 1)
    correct = audit(lambda n: float(selection.keep(n)), 0, 1, 20_000, claimed_epsilon=1.0, delta=1e-3,
                    confidence=CONFIDENCE)
    assert not correct.refutes
    broken = audit(lambda n: float(n >= 1), 0, 1, 2_000, claimed_epsilon=1.0, delta=1e-3, confidence=CONFIDENCE)
    assert broken.refutes and broken.epsilon_lower > 3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="as many runs"):
        epsilon_lower_bound(np.zeros(30), np.zeros(40), 1.0)
    with pytest.raises(ValueError, match=">= 20"):
        epsilon_lower_bound(np.zeros(10), np.zeros(10), 1.0)
