"""Mutation run over privrec's privacy-critical code: ``make mutants`` (``MUTANT_ARGS`` for options).

What it is. A small harness of *named* mutants, written by hand (not generated, as mutmut
would): each one is a single edit that weakens a privacy guarantee the way a plausible bug
would (noise x0 or x0.5, a sensitivity halved, contribution bounding or partition selection
skipped, a release's component left out of the ledger, the budget cap bypassed, masks not
applied...). For every mutant the harness edits the file in a throwaway copy of the working
tree (``git ls-files``, tracked and untracked-but-not-ignored files, copied once to /tmp; the
checkout itself is never touched), runs the mutant's kill tests there with pytest (``-x``:
the first failing test kills it), and puts the file back. A mutant whose tests all pass
SURVIVED: either a test is missing (write one that checks the property, e.g. measures the
noise, and list it) or the edit cannot change anything observable (mark it
``equivalent=True`` and say why in ``reason``). The kill tests are node ids of the normal
suite, so a mutant killed here is killed by ``make test`` too.

Before any mutant, the harness checks that every mutant's ``original`` occurs exactly once
in its file (so a mutant never silently stops applying when the code changes: the run fails
and names it), that the copy's ``privrec_pipeline`` (and through it ``jobs/`` and ``dags/``)
is what Python imports there (the venv's editable install points at the checkout), and that
every kill test passes on the unmutated copy.

Adding a mutant: append a ``Mutant`` to ``MUTANTS`` with a unique ``name``, the ``file``
(relative to the project root), the exact ``original`` text (one occurrence: include enough
context) and its ``replacement``, what guarantee it ``weakens``, and the ``tests`` that
should kill it, fastest first (Spark tests start a JVM: use them only for Spark code). Run
``make mutants MUTANT_ARGS='--only NAME'``; when the full run is green, record it with
``make mutants MUTANT_ARGS=--record`` (rewrites the ``mutants`` section of BENCHMARKS.md).

Options: ``--list`` (the mutants, nothing run), ``--only NAME`` (repeatable), ``--record``,
``--timeout SECONDS`` (per pytest run), ``--keep-copy``. Exit status: 0 if every mutant not
marked equivalent is killed, 1 if one survived (or errored), 2 if the run could not start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = ("<!-- mutants:start -->", "<!-- mutants:end -->")

# Kill tests (node ids of the normal suite).
MECH = "tests/test_dp_mechanisms.py"
NOISE = "tests/test_dp_stats_noise.py"
VARIANCES = f"{NOISE}::test_every_released_statistic_has_the_laplace_variance_of_its_share"
LONELY = f"{NOISE}::test_a_one_user_item_is_kept_at_most_delta_over_k_of_the_time"
SPLIT = f"{MECH}::test_release_budget_is_split_and_adds_up"
WIRING = "tests/test_privacy_wiring.py"
KEEP_RATE = f"{WIRING}::test_an_item_is_kept_at_the_keep_probability_of_its_planned_selection_budget"
STATS_LEDGER = f"{WIRING}::test_the_ledger_charges_a_dp_stats_release_what_each_statistic_spends"
TRAIN_LEDGER = f"{WIRING}::test_the_ledger_charges_a_training_run_its_planned_epsilon"
BOUNDING = "tests/test_dp_stats.py::test_one_user_with_10000_events_changes_any_count_by_at_most_the_bound"
SCALED = "tests/test_dp_stats.py::test_scaled_bounds_of_public_keys_move_the_tables_by_at_most_k_and_l_in_l1"
TRAIN = "tests/test_training.py"
TRAIN_NOISE = "tests/test_training_noise.py"
SECAGG = "tests/test_secure_aggregation.py"
LEDGER = "tests/test_ledger.py"
BOUNDS_TEST = "tests/test_dp_bounds.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str  # must occur exactly once in ``file``
    replacement: str
    weakens: str  # the guarantee the edit breaks
    tests: tuple[str, ...]  # pytest node ids expected to kill it, fastest first
    equivalent: bool = False
    reason: str = ""  # why an equivalent mutant cannot change anything observable

    def __post_init__(self) -> None:
        if self.equivalent != bool(self.reason):
            raise ValueError(f"mutant {self.name}: an equivalent mutant needs a reason, and only it has one")
        if not self.tests or self.original == self.replacement:
            raise ValueError(f"mutant {self.name}: needs kill tests and an edit")


MECHANISMS = "privrec_pipeline/privacy/mechanisms.py"
PARAMS = "privrec_pipeline/dp_stats/params.py"
NOISE_PY = "privrec_pipeline/dp_stats/noise.py"
BOUNDS_PY = "privrec_pipeline/dp_stats/bounds.py"
BOUNDING_PY = "privrec_pipeline/dp_stats/bounding.py"
DP_PY = "privrec_pipeline/training/dp.py"
FEDERATED = "privrec_pipeline/training/federated.py"
TASKS = "privrec_pipeline/training/tasks.py"
SECURE_RANDOM = "privrec_pipeline/training/secure_random.py"
SECURE_AGG = "privrec_pipeline/training/secure_agg.py"
ACCOUNTING = "privrec_pipeline/privacy/accounting.py"
LEDGER_PY = "privrec_pipeline/privacy/ledger.py"

MUTANTS: tuple[Mutant, ...] = (
    Mutant("auto_bounds_choice_not_charged", PARAMS,
           "epsilon = self.epsilon * (1 - self.bounds_epsilon_share * len(choices))",
           "epsilon = self.epsilon",
           "with chosen bounds the statistics spend the whole epsilon and the choices of K and T come on top, "
           "uncharged",
           (f"{BOUNDS_TEST}::test_the_ledger_is_charged_the_choice_and_the_bias_as_planned",)),
    Mutant("auto_bounds_score_without_sensitivity", BOUNDS_PY,
           "        return float(self.upper)\n", "        return 1.0\n",
           "the exponential mechanism choosing K ignores the score's sensitivity U (U x the stated epsilon)",
           (f"{BOUNDS_TEST}::test_the_choice_is_epsilon_dp_between_neighbouring_days",)),
    # -- DP statistics: Laplace noise ------------------------------------------------------
    Mutant("laplace_counts_unnoised", MECHANISMS,
           "return int(self._mechanism.add_noise(int(value)))", "return int(value)",
           "noise x0 on every released count",
           (f"{MECH}::test_integer_counts_are_unbiased_with_the_same_scale", VARIANCES)),
    Mutant("laplace_sums_unnoised", MECHANISMS,
           "return float(self._mechanism.add_noise(float(value)))", "return float(value)",
           "noise x0 on the price sum", (f"{MECH}::test_laplace_noise_has_the_variance_of_theory", VARIANCES)),
    Mutant("laplace_scale_halved", MECHANISMS,
           "self._mechanism = LaplaceMechanism(self.epsilon, self.sensitivity)",
           "self._mechanism = LaplaceMechanism(2 * self.epsilon, self.sensitivity)",
           "Laplace noise x0.5 (mechanism built at twice its epsilon)",
           (f"{MECH}::test_laplace_noise_has_the_variance_of_theory", VARIANCES)),
    Mutant("dp_stats_noise_halved", NOISE_PY,
           "return LaplaceNoise(budget.epsilon, budget.sensitivity, params.confidence_level)",
           "return LaplaceNoise(2 * budget.epsilon, budget.sensitivity, params.confidence_level)",
           "every statistic's noise x0.5", (VARIANCES,)),
    # -- DP statistics: sensitivities --------------------------------------------------------
    Mutant("sensitivity_item_users_halved", PARAMS, '"item_users": k, ', '"item_users": k / 2, ',
           "item user counts: sensitivity K / 2, noise x0.5", (SPLIT, VARIANCES)),
    Mutant("sensitivity_item_events_halved", PARAMS, '"item_events": k * c,', '"item_events": k * c / 2,',
           "item x event type table: sensitivity K C / 2", (SPLIT, VARIANCES)),
    Mutant("sensitivity_funnel_halved", PARAMS, '"funnel_users": len(EVENT_TYPES),',
           '"funnel_users": len(EVENT_TYPES) / 2,', "funnel: sensitivity #types / 2", (VARIANCES,)),
    Mutant("sensitivity_category_events_halved", PARAMS, "return kc_cc if t is None else min(kc_cc, t)",
           "return kc_cc / 2 if t is None else min(kc_cc, t)", "category events: sensitivity Kc Cc / 2",
           (VARIANCES,)),
    Mutant("sensitivity_category_total_halved", PARAMS, "return kc_cc if t is None else min(kc_cc, t)",
           "return kc_cc if t is None else min(kc_cc, t) / 2",
           "category events with a total cap T (chosen bounds): sensitivity T / 2",
           (f"{NOISE}::test_a_category_total_cap_sets_the_sensitivity_of_the_category_events",)),
    Mutant("sensitivity_price_sum_halved", PARAMS,
           '"purchase_price_sum": m * (self.price_upper - self.price_lower) / 2,',
           '"purchase_price_sum": m * (self.price_upper - self.price_lower) / 4,',
           "centred price sum: sensitivity M (hi - lo) / 4", (SPLIT, VARIANCES)),
    Mutant("sensitivity_purchase_count_halved", PARAMS, '"purchase_count": m,', '"purchase_count": m / 2,',
           "purchase count: sensitivity M / 2", (VARIANCES,)),
    Mutant("selection_l0_halved", PARAMS, '"item_selection": k, "item_users"',
           '"item_selection": max(k // 2, 1), "item_users"',
           "item selection assumes K / 2 items per user: per-key budget x2", (LONELY, KEEP_RATE)),
    # -- DP statistics: partition selection and the budget split ---------------------------
    Mutant("selection_skipped", NOISE_PY, "if key is not None and selection.keep(n)]", "if key is not None]",
           "every candidate item released, a one-user item included", (LONELY,)),
    Mutant("catalog_unseen_items_hidden", NOISE_PY, "kept = list(range(len(ids)))",
           "kept = [i for i, n in enumerate(users) if n > 0]",
           "a catalog item is released only if somebody touched it: its presence reveals that, unnoised",
           (f"{NOISE}::test_catalog_items_are_all_released_with_the_variance_of_their_share_and_no_other_key",)),
    Mutant("selection_delta_x10", NOISE_PY,
           "return PartitionSelection(budget.epsilon, budget.delta, int(budget.sensitivity)",
           "return PartitionSelection(budget.epsilon, 10 * budget.delta, int(budget.sensitivity)",
           "partition selection at 10x its delta", (LONELY, KEEP_RATE)),
    Mutant("selection_epsilon_x2", NOISE_PY,
           "return PartitionSelection(budget.epsilon, budget.delta, int(budget.sensitivity)",
           "return PartitionSelection(2 * budget.epsilon, budget.delta, int(budget.sensitivity)",
           "partition selection at 2x its epsilon", (KEEP_RATE,)),
    Mutant("pydp_selection_epsilon_x2", MECHANISMS,
           "create_partition_strategy(self.strategy, self.epsilon, self.delta, self.max_partitions)",
           "create_partition_strategy(self.strategy, 2 * self.epsilon, self.delta, self.max_partitions)",
           "PyDP's strategy built at 2x the selection's epsilon",
           (f"{MECH}::test_partition_selection_follows_the_truncated_geometric_probabilities",)),
    Mutant("budget_split_unnormalized", PARAMS, "epsilon=epsilon * weights[name] / eps_total,",
           "epsilon=epsilon * weights[name],",
           "statistics' epsilons sum to more than the release's when weights do not sum to 1",
           (f"{MECH}::test_statistics_can_be_left_out_and_public_categories_need_no_selection", STATS_LEDGER)),
    Mutant("delta_split_unnormalized", PARAMS,
           "delta=self.delta * self.delta_split[name] / delta_total if selection else 0.0,",
           "delta=self.delta * self.delta_split[name] if selection else 0.0,",
           "selections' deltas do not add up to the release's when a selection is left out",
           (f"{MECH}::test_statistics_can_be_left_out_and_public_categories_need_no_selection",)),
    # -- DP statistics: what the ledger is told ----------------------------------------------
    Mutant("selections_left_out_of_ledger", PARAMS, "return [b.component() for b in self.plan().values()]",
           'return [b.component() for b in self.plan().values() if b.mechanism == "laplace"]',
           "partition selections computed but not in the ledger", (STATS_LEDGER,)),
    Mutant("laplace_cost_understated", PARAMS,
           'return Component("laplace", noise_multiplier=1.0 / self.epsilon, label=self.name)',
           'return Component("laplace", noise_multiplier=2.0 / self.epsilon, label=self.name)',
           "the ledger charges each Laplace statistic half its epsilon", (STATS_LEDGER,)),
    # -- DP statistics: contribution bounding (Spark) ----------------------------------------
    Mutant("items_per_user_unbounded", BOUNDING_PY,
           'return ranked.where(F.col("rank") <= params.max_items_per_user)',
           'return ranked.where(F.col("rank") >= 1)',
           "bounding skipped: a user counts on every item (l0 > K)", (BOUNDING,)),
    Mutant("scaled_items_unbounded", BOUNDING_PY,
           'weight = F.least(F.lit(1.0), F.lit(float(params.max_items_per_user))',
           'weight = F.greatest(F.lit(1.0), F.lit(float(params.max_items_per_user))',
           "scaled bounds skipped: a user with many catalog items counts 1 for each (L1 > K)", (SCALED,)),
    Mutant("scaled_categories_unbounded", BOUNDING_PY,
           'weight = F.least(F.lit(1.0), F.lit(float(params.category_l1()))',
           'weight = F.greatest(F.lit(1.0), F.lit(float(params.category_l1()))',
           "scaled category bounds skipped: every event of a user counts (L1 > L)", (SCALED,)),
    Mutant("events_per_item_uncapped", BOUNDING_PY,
           "capped, remaining = [], F.lit(params.max_events_per_item)", "capped, remaining = [], F.lit(1 << 30)",
           "bounding skipped: any number of events per (user, item) (> C)", (BOUNDING,)),
    Mutant("events_per_category_uncapped", BOUNDING_PY,
           'F.least(F.col("events"), F.lit(params.max_events_per_category)).alias("events")',
           'F.col("events").alias("events")',
           "bounding skipped: any number of events per (user, category) (> Cc)", (BOUNDING,)),
    Mutant("category_total_uncapped", BOUNDING_PY,
           'F.least(F.col("events"), F.greatest(F.lit(total) - before, F.lit(0)))', 'F.col("events")',
           "bounding skipped: a user's events over all categories not capped at T (> the chosen L1 bound)",
           ("tests/test_dp_stats.py::test_a_category_total_cap_bounds_a_users_category_events",)),
    Mutant("category_bounds_choice_not_charged", PARAMS,
           "epsilon = self.epsilon * (1 - self.bounds_epsilon_share * len(choices))",
           "epsilon = self.epsilon * (1 - self.bounds_epsilon_share * min(len(choices), 1))",
           "with K and T chosen the statistics also spend T's share: the release spends more than its epsilon",
           (f"{BOUNDS_TEST}::test_the_ledger_is_charged_the_choice_and_the_bias_as_planned",
            "tests/test_ledger_costs.py::test_dp_stats_release_costs_exactly_its_statistics")),
    Mutant("price_clamp_skipped", BOUNDING_PY,
           "clamped = F.greatest(F.lit(lo), F.least(F.lit(hi), price))", "clamped = price",
           "bounding skipped: prices not clamped, the sum's sensitivity unbounded", (BOUNDING,)),
    Mutant("purchases_per_user_unbounded", BOUNDING_PY,
           'return ranked.where(F.col("rank") <= params.max_purchases_per_user).drop("rank")',
           'return ranked.drop("rank")',
           "bounding skipped: any number of purchases per user (> M)", (BOUNDING,)),
    # -- training: clipping and noise ------------------------------------------------------
    Mutant("per_user_clipping_skipped", DP_PY,
           "factors = torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)",
           "factors = torch.ones_like(norms)",
           "per-user clipping skipped: a user's influence unbounded",
           (f"{TRAIN}::test_clipping_bounds_any_users_influence_even_adversarial_ones",
            f"{WIRING}::test_one_user_moves_a_partition_update_by_at_most_the_clip_norm")),
    Mutant("clip_norm_doubled_in_rounds", FEDERATED,
           "step = dp_gradient(model, batch, clip_norm=config.clip_norm,",
           "step = dp_gradient(model, batch, clip_norm=2 * config.clip_norm,",
           "partitions clip at 2C while the noise is sigma C",
           (f"{WIRING}::test_one_user_moves_a_partition_update_by_at_most_the_clip_norm",)),
    Mutant("gaussian_noise_halved", DP_PY,
           "draws[offset:offset + n].reshape(p.shape) * noise_std)",
           "draws[offset:offset + n].reshape(p.shape) * noise_std / 2)",
           "DP-SGD noise x0.5 on every coordinate",
           (f"{TRAIN}::test_noise_has_the_calibrated_standard_deviation",)),
    Mutant("csprng_gaussian_std_halved", SECURE_RANDOM,
           "return (draws.sum(dim=0) / math.sqrt(SECURE_DRAWS)).numpy()",
           "return (draws.sum(dim=0) / SECURE_DRAWS).numpy()",
           "the CSPRNG's 'standard' normal has std 0.5: training noise x0.5",
           (f"{TRAIN_NOISE}::test_gaussian_samples_are_standard_normal",)),
    Mutant("csprng_fewer_draws", SECURE_RANDOM, "SECURE_DRAWS = 4  #", "SECURE_DRAWS = 2  #",
           "one Box-Muller draw pair per sample: the floating-point attack mitigation (Holohan & Braghin) gone",
           (f"{WIRING}::test_a_gaussian_sample_uses_four_keystream_words",)),
    Mutant("share_variance_over_p", DP_PY,
           "return noise_multiplier * clip_norm / math.sqrt(parties - tolerance)",
           "return noise_multiplier * clip_norm / math.sqrt(parties)",
           "distributed shares sized for P, not P - t, honest parties: t colluders leave too little noise",
           (f"{TRAIN}::test_any_p_minus_t_honest_noise_shares_carry_the_full_noise",)),
    Mutant("planned_noise_halved", FEDERATED,
           "noise = noise_std_share(sigma, config.clip_norm, parties, tolerance)",
           "noise = noise_std_share(sigma / 2, config.clip_norm, parties, tolerance)",
           "noise x0.5 in both modes (the plan's per-partition std)",
           (f"{TRAIN}::test_by_default_every_share_alone_carries_the_full_noise_and_the_accounting_is_sigmas",
            f"{TRAIN_NOISE}::test_one_noisy_gradient_has_the_planned_per_coordinate_std")),
    Mutant("local_step_noise_halved", FEDERATED,
           "noise = plan.noise_std_per_partition",
           'noise = plan.noise_std_per_partition * (0.5 if config.mode == "local" else 1.0)',
           "local mode: each step's noise x0.5",
           (f"{WIRING}::test_every_local_step_hands_the_optimizer_a_gradient_with_the_full_noise",)),
    Mutant("distributed_step_noise_halved", FEDERATED,
           "noise_std=noise, denominator=denominator,", "noise_std=noise / 2, denominator=denominator,",
           "distributed mode: each partition's noise share x0.5",
           (f"{TRAIN_NOISE}::test_one_noisy_gradient_has_the_planned_per_coordinate_std",)),
    Mutant("empty_step_unnoised", FEDERATED,
           "add_noise(model, random, noise, denominator)", "add_noise(model, random, 0.0, denominator)",
           "a step that sampled nobody adds no noise (the accountant counts it)",
           (f"{TRAIN}::test_a_step_that_samples_nobody_is_pure_noise_of_the_planned_scale",)),
    Mutant("task_noise_halved", TASKS,
           "delta, stats = partition_update(config, plan, state,",
           "delta, stats = partition_update(config, __import__('dataclasses').replace(plan, "
           "noise_std_per_partition=plan.noise_std_per_partition / 2), state,",
           "the DAG's train_partition task trains with noise x0.5",
           (f"{SECAGG}::test_a_tiny_run_aggregates_the_exact_sum_of_the_partitions_updates",)),
    Mutant("local_denominator_doubled", FEDERATED,
           'denominator = q * (sum(plan.population) if config.mode == "distributed" else plan.population[partition])',
           'denominator = q * (sum(plan.population) if config.mode == "distributed" else 2 * plan.population[partition])',
           "local mode: gradient sum and its noise both / 2 before Adam",
           (f"{TRAIN}::test_a_step_that_samples_nobody_is_pure_noise_of_the_planned_scale",
            f"{SECAGG}::test_a_tiny_run_aggregates_the_exact_sum_of_the_partitions_updates"),
           equivalent=True,
           reason="the denominator divides the clipped sum and its noise alike, so the noise-to-sensitivity "
                  "ratio (the guarantee) is unchanged; in local mode only Adam sees the result, and Adam's "
                  "step is invariant to the gradient's scale up to its eps of 1e-8"),
    # -- training: sampling and accounting --------------------------------------------------
    Mutant("sampling_rate_doubled", FEDERATED,
           "sampled = np.flatnonzero(random.bernoulli(shard.users, q))",
           "sampled = np.flatnonzero(random.bernoulli(shard.users, min(1.0, 2 * q)))",
           "users sampled at 2q, accounted at q",
           (f"{WIRING}::test_poisson_sampling_draws_users_at_the_accounted_rate",)),
    Mutant("calibrated_at_smallest_rate", FEDERATED,
           "sigma = calibrate_noise(config.epsilon, config.delta, max(rates), steps)",
           "sigma = calibrate_noise(config.epsilon, config.delta, min(rates), steps)",
           "sigma calibrated for the largest partition: smaller ones exceed the target",
           (f"{TRAIN}::test_plan_reports_each_partition_and_the_worst_case",)),
    Mutant("ledger_rate_understated", TASKS, "sampling_rate=max(plan.sampling_rates), label=",
           "sampling_rate=min(plan.sampling_rates), label=",
           "the ledger is told the smallest sampling rate (local mode)", (TRAIN_LEDGER,)),
    Mutant("ledger_steps_understated", TASKS, 'return [Component("gaussian", count=plan.steps,',
           'return [Component("gaussian", count=config.rounds,',
           "the ledger counts rounds, not local steps", (TRAIN_LEDGER,)),
    # -- the ledger ------------------------------------------------------------------------
    Mutant("grouped_drops_counts", ACCOUNTING, "counts[key] = counts.get(key, 0) + c.count",
           "counts[key] = c.count", "equal releases composed as one",
           (f"{LEDGER}::test_cap_is_enforced_with_a_message_naming_the_numbers[sqlite]",)),
    Mutant("window_spend_skips_a_release", LEDGER_PY,
           "components = [c for r in inside for c in r.components]",
           "components = [c for r in inside[1:] for c in r.components]",
           "a window's spend leaves its first release out",
           (f"{LEDGER}::test_cap_is_enforced_with_a_message_naming_the_numbers[sqlite]",)),
    Mutant("cap_check_bypassed", LEDGER_PY,
           "if worst is not None and worst.epsilon > self.policy.epsilon:",
           "if False and worst is not None and worst.epsilon > self.policy.epsilon:",
           "reserve never refuses a release over the cap",
           (f"{LEDGER}::test_cap_is_enforced_with_a_message_naming_the_numbers[sqlite]",)),
    Mutant("open_reservations_not_counted", LEDGER_PY,
           "active = [r for r in everything if r.state in (RESERVED, COMMITTED)]",
           "active = [r for r in everything if r.state == COMMITTED]",
           "reservations in progress do not count against the cap",
           (f"{LEDGER}::test_every_rolling_window_is_checked[sqlite]",)),
    Mutant("earlier_windows_unchecked", LEDGER_PY,
           "start = candidate.window_start - dt.timedelta(days=w - 1)", "start = candidate.window_start",
           "only policy windows starting at the new release are checked",
           (f"{LEDGER}::test_cap_is_enforced_with_a_message_naming_the_numbers[sqlite]",)),
    Mutant("lifetime_cap_ignores_new_release", LEDGER_PY, "if after > self.policy.lifetime_epsilon:",
           "if before > self.policy.lifetime_epsilon:", "the lifetime cap leaves the new release out",
           (f"{LEDGER}::test_lifetime_cap_counts_every_release_ever_made[sqlite]",)),
    Mutant("resume_without_description_proof", LEDGER_PY, "if release.description_hash == digest:",
           "if True:", "a resume computes other parameters than the ledger holds",
           (f"{LEDGER}::test_a_resume_with_other_parameters_fails_naming_both[sqlite]",)),
    Mutant("live_lease_ignored", LEDGER_PY,
           "if current.owner != run_id and self._lease_live(current, now):", "if False:",
           "two runs compute (and draw noise for) one reservation",
           (f"{LEDGER}::test_one_run_holds_a_release_and_another_cannot_publish_or_fail_it[sqlite]",)),
    Mutant("commit_without_lease", LEDGER_PY,
           "if current.owner != run_id:\n            raise LeaseLost(\n                f\"release {current.id} (",
           "if False:\n            raise LeaseLost(\n                f\"release {current.id} (",
           "a run that lost its lease still publishes",
           (f"{LEDGER}::test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced_off[sqlite]",)),
    Mutant("edited_row_undetected", LEDGER_PY, "if rows[rid] != latest[rid]:", "if False:",
           "an edited release row (a reset budget) passes verification",
           (f"{LEDGER}::test_verify_detects_every_edit_and_reserve_fails_closed[sqlite-edit_epsilon]",)),
    # -- secure aggregation ----------------------------------------------------------------
    Mutant("masks_not_applied", SECURE_AGG,
           "return encoded + pairwise_mask(keys, public_keys, run_id, round_index, flat.size)",
           "return encoded", "the aggregator sees each partition's update in the clear",
           (f"{TRAIN}::test_a_masked_update_is_uniform_and_the_sum_is_exact_within_quantization",
            f"{SECAGG}::test_what_a_partition_writes_is_masked")),
    Mutant("zero_masks", SECURE_AGG,
           'return np.frombuffer(encryptor.update(b"\\x00" * (8 * size)), dtype=np.uint64).copy()',
           "return np.zeros(size, dtype=np.uint64)", "degenerate (all-zero) masks",
           (f"{TRAIN}::test_a_masked_update_is_uniform_and_the_sum_is_exact_within_quantization",)),
    Mutant("masks_do_not_cancel", SECURE_AGG,
           "total = total + mask if me == low else total - mask", "total = total + mask",
           "correctness: pairwise masks added by both parties, the sum is garbage",
           (f"{TRAIN}::test_a_masked_update_is_uniform_and_the_sum_is_exact_within_quantization",)),
    Mutant("pad_from_public_data", SECURE_AGG,
           "mask = _mask(shared, f", 'mask = _mask(b"\\x00" * 32, f',
           "pads derived from public data: the aggregator can strip them",
           (f"{WIRING}::test_a_pad_comes_from_the_pairs_shared_secret",)),
    Mutant("round_keys_unkeyed", SECURE_AGG,
           "seed = _hkdf(partition_secret, f", 'seed = _hkdf(b"\\x00" * 32, f',
           "key pairs derivable without the partition's secret",
           (f"{WIRING}::test_a_pad_comes_from_the_pairs_shared_secret",)),
    Mutant("single_party_allowed", SECURE_AGG, "if parties < MIN_PARTIES:", "if parties < 1:",
           "one party's 'masked' update is its update in the clear",
           (f"{SECAGG}::test_a_single_party_is_refused",)),
    Mutant("task_sends_unmasked", TASKS,
           'masked = mask_update(delta, keys, public, doc["run_id"], round_index)',
           "masked = __import__('privrec_pipeline.training.secure_agg', fromlist=['encode'])"
           ".encode(delta, len(public))",
           "train_partition writes its update unmasked (the sum still comes out right)",
           (f"{SECAGG}::test_what_a_partition_writes_is_masked",)),
    # -- pseudonymization (Spark) ------------------------------------------------------------
    Mutant("user_pseudonym_unkeyed", "privrec_pipeline/transforms/pseudonymize.py",
           'crypto.pseudonym(ipad, opad, "user", F.col("user_id"))',
           'F.lower(F.sha2(F.concat(F.lit("user:"), F.col("user_id")), 256))',
           "user pseudonyms are an unkeyed hash anyone can recompute from a user id",
           ("tests/test_pseudonymize.py::test_pseudonyms_are_keyed_hmac_with_version",)),
)


@dataclass
class Outcome:
    mutant: Mutant
    result: str  # killed, SURVIVED, equivalent, ERROR ..., TIMEOUT
    killers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.result not in ("killed", "equivalent")


def project_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files (new tests count), as they are on disk."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode("utf-8")
    return sorted({f for f in out.split("\0") if f and ((root / f).is_file() or (root / f).is_symlink())})


def make_copy(root: Path) -> Path:
    """The project's files in a fresh folder under the temp dir; ``../shared`` (data the tests
    find next to the project) is linked, not copied."""
    base = Path(tempfile.mkdtemp(prefix="privrec-mutants-"))
    copy = base / root.name
    for name in project_files(root):
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)
    if (root.parent / "shared").is_dir():
        (base / "shared").symlink_to(root.parent / "shared")
    return copy


def check_snippets(copy: Path, mutants: tuple[Mutant, ...]) -> list[str]:
    problems = []
    names = [m.name for m in mutants]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: the name is used twice")
    for m in mutants:
        path = copy / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        found = path.read_text(encoding="utf-8").count(m.original)
        if found != 1:
            problems.append(f"{m.name}: its original text occurs {found} times in {m.file}, not once "
                            f"(the code changed: update the mutant): {m.original!r}")
    return problems


def environment(copy: Path) -> dict[str, str]:
    """``make test``'s environment, with the copy first on the import path, its own lake, and
    no bytecode files (a file restored within the same second must not reuse a stale one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PRIVREC_LAKE"] = str(copy / "lake")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(copy: Path, env: dict[str, str]) -> None:
    """The copy's package (and so its jobs/ and dags/, found next to it) is what runs there,
    not the checkout the venv's editable install points at."""
    probe = ("import privrec_pipeline, privrec_pipeline.config as c\n"
             "print(privrec_pipeline.__file__); print(c.JOBS_DIR); print(c.PROJECT_ROOT)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    outside = [p for p in out if not Path(p).resolve().is_relative_to(copy.resolve())]
    if outside:
        raise SystemExit(f"mutants: the copy in {copy} does not import its own code ({outside}); aborting")


def pytest_run(copy: Path, env: dict[str, str], tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               f"--basetemp={copy.parent / 'pytest-tmp'}", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return None, out, time.monotonic() - start
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def failed_tests(output: str) -> list[str]:
    """Node ids of the failing tests from pytest's short summary (``-ra``, set in pyproject)."""
    return [m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)]


def run_mutant(copy: Path, env: dict[str, str], mutant: Mutant, timeout: float) -> Outcome:
    path = copy / mutant.file
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(mutant.original, mutant.replacement, 1), encoding="utf-8")
    try:
        code, output, seconds = pytest_run(copy, env, list(mutant.tests), timeout)
    finally:
        path.write_text(text, encoding="utf-8")
    killers = failed_tests(output)
    if code is None:
        return Outcome(mutant, "TIMEOUT", killers, seconds, f"no result in {timeout:.0f} s")
    if code == 0:
        return Outcome(mutant, "equivalent" if mutant.equivalent else "SURVIVED", [], seconds)
    if code == 1 and killers:
        detail = "marked equivalent, but a test kills it: remove the mark" if mutant.equivalent else ""
        return Outcome(mutant, "killed", killers, seconds, detail)
    tail = "\n".join(output.strip().splitlines()[-15:])
    return Outcome(mutant, f"ERROR (pytest exit {code})", killers, seconds, tail)


def describe_code(copy: Path, mutants: tuple[Mutant, ...]) -> str:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256()
    for name in sorted({m.file for m in mutants} | {t.split("::")[0] for m in mutants for t in m.tests}):
        digest.update(name.encode() + b"\0" + (copy / name).read_bytes())
    return (f"git `{head}`{' with uncommitted changes' if dirty else ''}; sha256 of the mutated modules and "
            f"their kill-test files `{digest.hexdigest()[:12]}`")


def markdown(outcomes: list[Outcome], code: str, seconds: float, baseline: float) -> str:
    killed = sum(o.result == "killed" for o in outcomes)
    equivalent = [o for o in outcomes if o.result == "equivalent"]
    bad = [o for o in outcomes if o.bad]
    lines = [
        SECTION[0],
        "## Mutation run: the privacy-critical modules",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}",
        "- Command: `make mutants MUTANT_ARGS=--record` (`scripts/mutants.py`: each mutant is one edit in a "
        "copy of the working tree; its kill tests, a subset of `make test`, run with `pytest -x`; the first "
        "failing test kills it)",
        f"- Code: {code}",
        f"- Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; total {seconds / 60:.1f} min "
        f"(baseline of all kill tests on the unmutated copy {baseline:.0f} s)",
        f"- Result: {len(outcomes)} mutants: {killed} killed, {len(equivalent)} equivalent, "
        f"{len(bad)} survived or failed to run",
        "",
        "| mutant | file | what it weakens | result | killed by | s |",
        "|---|---|---|---|---|---:|",
    ]
    for o in outcomes:
        m = o.mutant
        killer = ", ".join(f"`{k}`" for k in o.killers[:1]) or "-"
        lines.append(f"| `{m.name}` | `{m.file.removeprefix('privrec_pipeline/')}` | {m.weakens} | "
                     f"{o.result} | {killer} | {o.seconds:.0f} |")
    if equivalent:
        lines += ["", "Equivalent mutants (they survive by construction):", ""]
        lines += [f"- `{o.mutant.name}`: {o.mutant.reason}." for o in equivalent]
    return "\n".join([*lines, SECTION[1]])


def record(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the mutants section of BENCHMARKS.md (between the markers), or append it: the
    benchmarks' own section writer."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.ingest import update_markdown

    update_markdown(section, path, SECTION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and their kill tests, run nothing")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant only (repeatable)")
    parser.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md (full run only)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run (default 1800)")
    parser.add_argument("--keep-copy", action="store_true", help="keep the mutated tree's copy for inspection")
    args = parser.parse_args(argv)

    selected = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s) {unknown}; see --list")
        selected = tuple(m for m in MUTANTS if m.name in args.only)
    if args.record and args.only:
        parser.error("--record writes the whole table: run every mutant (no --only)")
    if args.list:
        for m in selected:
            mark = " [equivalent]" if m.equivalent else ""
            print(f"{m.name}{mark}\n  {m.file}: {m.weakens}\n  kill tests: {', '.join(m.tests)}")
        return 0

    started = time.monotonic()
    copy = make_copy(ROOT)
    try:
        problems = check_snippets(copy, MUTANTS)  # all of them, also under --only: none may rot
        if problems:
            print("mutants: cannot apply every mutant:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        env = environment(copy)
        check_imports(copy, env)
        tests = list(dict.fromkeys(t for m in selected for t in m.tests))
        print(f"copy of the working tree: {copy}\nbaseline: {len(tests)} kill tests on the unmutated copy ...",
              flush=True)
        code, output, baseline = pytest_run(copy, env, tests, args.timeout)
        if code != 0:
            print(output[-5000:], file=sys.stderr)
            print(f"mutants: the kill tests fail without any mutant (pytest exit {code}); fix them first",
                  file=sys.stderr)
            return 2
        print(f"baseline passed in {baseline:.0f} s", flush=True)
        outcomes = []
        for i, mutant in enumerate(selected, 1):
            outcome = run_mutant(copy, env, mutant, args.timeout)
            outcomes.append(outcome)
            who = f" by {outcome.killers[0]}" if outcome.killers else ""
            print(f"[{i}/{len(selected)}] {mutant.name}: {outcome.result}{who} ({outcome.seconds:.0f} s)"
                  + (f"\n    {outcome.detail}" if outcome.detail else ""), flush=True)
        seconds = time.monotonic() - started
        bad = [o for o in outcomes if o.bad]
        print(f"\n{len(outcomes)} mutants in {seconds / 60:.1f} min: "
              f"{sum(o.result == 'killed' for o in outcomes)} killed, "
              f"{sum(o.result == 'equivalent' for o in outcomes)} equivalent, {len(bad)} survived or failed"
              + "".join(f"\n  {o.mutant.name}: {o.result} ({o.mutant.weakens})" for o in bad))
        if args.record:
            record(markdown(outcomes, describe_code(copy, MUTANTS), seconds, baseline))
            print(f"recorded in {BENCHMARKS_MD}")
        return 1 if bad else 0
    finally:
        if args.keep_copy:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
