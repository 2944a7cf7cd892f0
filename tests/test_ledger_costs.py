"""The ledger's cost of a release, asserted both ways: equal (to a relative 1e-6) to the cost
computed here, independently, with dp_accounting. An upper bound alone would let the ledger
over-count (and waste the budget) unnoticed; a lower bound alone would let it under-count
(and break the privacy guarantee).

- dp_stats: the release's epsilon is the basic composition of its statistics' epsilons (the
  release's epsilon, split by the weights); the window's tight epsilon is the PLD composition
  of Laplace mechanisms with noise multiplier 1 / epsilon_i (sensitivity 1: the noise scale
  is the statistic's sensitivity / epsilon_i) and, for partition selection, of
  (epsilon_i, delta_i)-DP mechanisms, read at the policy's delta.
- training: the release's epsilon is the RDP epsilon of ``steps`` Poisson-sampled Gaussian
  steps (rate q, noise multiplier sigma) at the release's delta; the window's tight epsilon is
  their PLD composition at the policy's delta.

The expected numbers are written out from the settings (split weights, batch size, partition
sizes, rounds and steps), not taken from privrec's plan; dp_accounting is called directly,
not through ``privacy.accounting``.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from privrec_pipeline.dp_stats.params import DPStatsParams
from privrec_pipeline.privacy.ledger import BudgetPolicy, Ledger

DAY = dt.date(2026, 1, 15)
REL = 1e-6
POLICY = BudgetPolicy(epsilon=1000.0, delta=1e-6, window_days=30)  # a cap that never binds here

# epsilon 2.04 split by the default weights (0.4, 0.2, 0.1, 0.05, 0.1, 0.05, 0.05, 0.05, 0.02: they
# sum to 1.02), delta 1e-8 split 0.8 / 0.2 between the two partition selections.
DEFAULT_PLAN = {
    "item_selection": ("approx_dp", 0.8, 0.8e-8),
    "item_users": ("laplace", 0.4, 0.0),
    "item_events": ("laplace", 0.2, 0.0),
    "funnel_users": ("laplace", 0.1, 0.0),
    "category_selection": ("approx_dp", 0.2, 0.2e-8),
    "category_events": ("laplace", 0.1, 0.0),
    "purchase_price_sum": ("laplace", 0.1, 0.0),
    "purchase_count": ("laplace", 0.1, 0.0),
    "bounding_bias": ("laplace", 0.04, 0.0),
}
# Laplace statistics only (no partition selection): weights 1 : 2 : 1 of epsilon 1.
LAPLACE_ONLY_SPLIT = {"item_selection": 0, "item_users": 0, "item_events": 0, "category_selection": 0,
                      "category_events": 0, "funnel_users": 1, "purchase_price_sum": 2, "purchase_count": 1,
                      "bounding_bias": 0}
LAPLACE_ONLY_PLAN = {
    "funnel_users": ("laplace", 0.25, 0.0),
    "purchase_price_sum": ("laplace", 0.5, 0.0),
    "purchase_count": ("laplace", 0.25, 0.0),
}
DP_STATS_CASES = {
    "default split": (DPStatsParams(epsilon=2.04, delta=1e-8), DEFAULT_PLAN),
    "laplace only": (DPStatsParams(epsilon=1.0, delta=1e-8, epsilon_split=LAPLACE_ONLY_SPLIT), LAPLACE_ONLY_PLAN),
}
# With a catalog (public items and categories) the default settings choose K and T: two
# exponential mechanisms, pure (epsilon, 0)-DP, at 0.03 of epsilon 2 each (0.06); the
# statistics split the other 1.88 by the catalog's weights (summing to 1 without the
# selections): 1.88 x w. No selection: delta 0.
CATALOG_PLAN = {
    "item_bounds": ("approx_dp", 0.06, 0.0),
    "category_bounds": ("approx_dp", 0.06, 0.0),
    "item_users": ("laplace", 1.88 * 0.68, 0.0),
    "item_events": ("laplace", 1.88 * 0.02, 0.0),
    "funnel_users": ("laplace", 1.88 * 0.03, 0.0),
    "category_events": ("laplace", 1.88 * 0.12, 0.0),
    "purchase_price_sum": ("laplace", 1.88 * 0.025, 0.0),
    "purchase_count": ("laplace", 1.88 * 0.025, 0.0),
    "bounding_bias": ("laplace", 1.88 * 0.07, 0.0),
    "category_bias": ("laplace", 1.88 * 0.03, 0.0),
}
CATALOG_CASES = {
    "catalog, chosen bounds": (DPStatsParams(epsilon=2.0, delta=1e-8, public_items=True,
                                             public_categories=("books", "toys")), CATALOG_PLAN),
}


def assert_same_cost(recorded: float, computed: float, what: str) -> None:
    """Equal within a relative 1e-6, with the direction of the error in the message."""
    gap = recorded - computed
    assert abs(gap) <= REL * abs(computed), (
        f"{what}: the ledger records {recorded!r}, the mechanisms cost {computed!r}: it "
        f"{'over-counts (wastes budget)' if gap > 0 else 'under-counts (the guarantee does not hold)'} by {gap:.3g}")


def pld_epsilon(plan: dict[str, tuple[str, float, float]], delta: float) -> float:
    """dp_accounting's PLD of the plan's mechanisms, composed one by one, at ``delta``."""
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld

    composed = None
    for mechanism, epsilon, delta_i in plan.values():
        if mechanism == "laplace":
            one = pld.from_laplace_mechanism(1.0 / epsilon, sensitivity=1.0)
        else:
            one = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(epsilon, delta_i))
        composed = one if composed is None else composed.compose(one)
    return float(composed.get_epsilon_for_delta(delta))


def _ledger(tmp_path, name: str = "ledger.db") -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / name}", POLICY)


# -- dp_stats ---------------------------------------------------------------------------


def _dp_stats_reservation(ledger: Ledger, params: DPStatsParams):
    """Reserve a dp_stats release of DAY as ``run_dp_stats`` does (its cost from the params)."""
    epsilon, delta = params.spent()
    return ledger.reserve("dp_stats", DAY, DAY, params.components(), epsilon=epsilon, delta=delta,
                          dag_id="privrec_nightly", run_id="run-1")


def _check_dp_stats_cost(ledger: Ledger, params: DPStatsParams, plan: dict) -> None:
    (release,) = ledger.releases()
    spend = ledger.spend_at(DAY)
    assert [r.id for r in spend.releases] == [release.id]  # the window holds exactly this release
    # The release's own (epsilon, delta): basic composition of its statistics.
    basic_epsilon = sum(eps for _, eps, _ in plan.values())
    basic_delta = sum(d for _, _, d in plan.values())
    assert basic_epsilon == pytest.approx(params.epsilon, rel=1e-12)  # the split spends the whole epsilon
    assert_same_cost(release.epsilon, basic_epsilon, "the release's epsilon")
    assert_same_cost(spend.basic_epsilon, basic_epsilon, "the window's basic epsilon")
    if basic_delta:
        assert_same_cost(release.delta, basic_delta, "the release's delta")
        assert_same_cost(spend.basic_delta, basic_delta, "the window's basic delta")
    else:
        assert release.delta == spend.basic_delta == 0.0
    # The mechanisms the ledger holds are the plan's, one per statistic, at the plan's budget.
    held = {c.label: c for c in release.components}
    assert set(held) == set(plan)
    for name, (mechanism, epsilon, delta) in plan.items():
        assert held[name].mechanism == mechanism and held[name].count == 1, name
        if mechanism == "laplace":
            assert_same_cost(1.0 / held[name].noise_multiplier, epsilon, f"{name}'s Laplace epsilon")
        else:
            assert_same_cost(held[name].epsilon, epsilon, f"{name}'s epsilon")
            assert_same_cost(held[name].delta, delta, f"{name}'s delta")
    # The window's tight spend: dp_accounting's PLD composition at the policy's delta.
    tight = pld_epsilon(plan, POLICY.delta)
    assert_same_cost(spend.epsilon, tight, "the window's tight (PLD) epsilon")
    assert tight <= basic_epsilon + 1e-9


@pytest.mark.parametrize("case", {**DP_STATS_CASES, **CATALOG_CASES})
def test_dp_stats_release_costs_exactly_its_statistics(tmp_path, case):
    params, plan = {**DP_STATS_CASES, **CATALOG_CASES}[case]
    ledger = _ledger(tmp_path)
    assert _dp_stats_reservation(ledger, params).spends
    _check_dp_stats_cost(ledger, params, plan)
    # Committed, the release costs the same; a rerun reuses it and adds nothing.
    (release,) = ledger.releases()
    ledger.commit(release.id, {"uri": "gold"}, run_id="run-1")
    assert not ledger.reserve("dp_stats", DAY, DAY, params.components(), epsilon=params.spent()[0],
                              delta=params.spent()[1], dag_id="privrec_nightly", run_id="run-2").spends
    _check_dp_stats_cost(ledger, params, plan)


class _Reserved(Exception):
    """Stops ``run_dp_stats`` right after its reservation (the release stays reserved: counted)."""


@pytest.mark.spark
@pytest.mark.parametrize("case", DP_STATS_CASES)
def test_run_dp_stats_reserves_exactly_the_cost_of_its_statistics(spark, tmp_path, case):
    """The same, for what ``run_dp_stats`` itself reserves (stopped before computing anything:
    a reserved release is counted as a committed one)."""
    from privrec_pipeline import lake as lk
    from privrec_pipeline.dp_stats.release import run_dp_stats
    from privrec_pipeline.quality.validate import SUMMARY_FILE, report_uri

    params, plan = DP_STATS_CASES[case]
    lake = str(tmp_path / "lake")
    summary = lk.path(f"{report_uri(lake, DAY)}/{SUMMARY_FILE}")
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"gate": "passed"}))
    manifest = lk.path(lk.manifest_uri(lake, "pseudonymize", DAY))
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"pseudonym_key_version": "v1", "pseudonym_key_fingerprint": "0123456789abcdef"}))

    class StopAfterReserve(Ledger):
        def reserve(self, *args, **kwargs):
            raise _Reserved(super().reserve(*args, **kwargs))

    ledger = StopAfterReserve(f"sqlite:///{tmp_path / 'ledger.db'}", POLICY)
    with pytest.raises(_Reserved) as stopped:
        run_dp_stats(spark, lake, DAY, params, ledger, run_id="run-1", dag_id="privrec_nightly")
    assert stopped.value.args[0].spends and stopped.value.args[0].release.state == "reserved"
    _check_dp_stats_cost(ledger, params, plan)


# -- training ---------------------------------------------------------------------------

WINDOW = [dt.date(2026, 1, 13), dt.date(2026, 1, 14), dt.date(2026, 1, 15)]
PARTITION_USERS = [400, 250, 320]
TRAINING_CASES = {
    # local: each partition samples batch_size / its DP size; the worst (smallest) partition counts
    "local": (dict(mode="local", epsilon=3.0, delta=1e-7, rounds=3, local_steps=4, batch_size=25),
              lambda n: 25 / min(n), 3 * 4),
    # distributed: one central sample of batch_size / all users (DP count), one step per round
    "distributed": (dict(mode="distributed", epsilon=5.0, delta=1e-6, rounds=6, batch_size=60),
                    lambda n: 60 / sum(n), 6),
}


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def _pld_training_epsilon(q: float, sigma: float, steps: int, delta: float, laplace_epsilon: float = 0.0) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    if laplace_epsilon:
        accountant.compose(dp_event.LaplaceDpEvent(1.0 / laplace_epsilon))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_training_release_costs_exactly_its_sampled_gaussian_steps(tmp_path, monkeypatch, case):
    from privrec_pipeline import lake as lk
    from privrec_pipeline.privacy.ledger import open_ledger
    from privrec_pipeline.training import tasks
    from privrec_pipeline.training.federated import TrainConfig

    settings, rate, steps = TRAINING_CASES[case]
    lake = str(tmp_path / "lake")
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRIVREC_BUDGET_EPSILON", str(POLICY.epsilon))
    manifest = lk.path(lk.manifest_uri(lake, "build_partitions", WINDOW[-1]))
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "window": [d.isoformat() for d in WINDOW], "vocabulary_size": 12,
        "partitions": {str(k): {"users": n} for k, n in enumerate(PARTITION_USERS)},
        "pseudonym_key_fingerprint": "0123456789abcdef"}))
    config = TrainConfig(dim=4, **settings)
    state = tasks.prepare_training(lake, WINDOW[-1], config, run_id="run-1", dag_id="privrec_nightly")
    assert state["status"] == "new"

    ledger = open_ledger(lake)
    # First the DP partition counts (Laplace, its own release), then the training steps, whose
    # sampling rate comes from those counts.
    from privrec_pipeline.privacy.accounting import pure_epsilon

    population, release = ledger.releases()
    assert (population.release_key, [pure_epsilon(c) for c in population.components]) == (
        "population", [(pytest.approx(config.population_epsilon), 0.0)])
    q = rate(population.result["partition_users"])
    assert (release.release_key, release.window_start, release.window_end) == ("training", WINDOW[0], WINDOW[-1])
    (component,) = release.components
    assert (component.mechanism, component.count) == ("gaussian", steps)
    assert_same_cost(component.sampling_rate, q, "the sampling rate")
    sigma = component.noise_multiplier
    assert sigma == state["plan"]["noise_multiplier"] > 0  # the noise the partitions draw
    # The release's own epsilon: RDP of the sampled Gaussian at the release's delta.
    rdp = _rdp_epsilon(q, sigma, steps, config.delta)
    assert_same_cost(release.epsilon, rdp, "the training release's epsilon (RDP)")
    assert release.delta == config.delta
    assert config.epsilon * (1 - 1e-3) <= rdp <= config.epsilon  # calibrated to the target, not below it
    # The window holds exactly these two releases: its basic spend is their sum, its tight spend
    # the PLD composition of the same steps and the Laplace counts at the policy's delta.
    for day in WINDOW:
        spend = ledger.spend_at(day, 1)
        assert [r.id for r in spend.releases] == [population.id, release.id]
        assert_same_cost(spend.basic_epsilon, rdp + config.population_epsilon, f"the basic epsilon of {day}")
        assert spend.basic_delta == config.delta
    spend = ledger.spend_at(WINDOW[-1])
    tight = _pld_training_epsilon(q, sigma, steps, POLICY.delta, config.population_epsilon)
    assert_same_cost(spend.epsilon, tight, "the window's tight (PLD) epsilon")
    assert math.isfinite(tight) and tight > 0
    assert ledger.spend_at(WINDOW[0] - dt.timedelta(days=1), 1).releases == []  # outside the window: nothing
