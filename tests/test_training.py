"""Privacy properties of user-level DP training and secure aggregation (no Spark): the
closed-form per-user norms equal autograd's, clipping bounds any user's influence, the noise
has the calibrated scale, the accountant meets the target, masked updates look uniform and
sum to the plain sum, and randomness is reproducible per (seed, round, partition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.training import secure_agg
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.dp import (
    Batch,
    calibrate_noise,
    dp_gradient,
    epsilon_for,
    per_user_grad_norms,
    user_losses,
)
from privrec_pipeline.training.federated import (
    TrainConfig,
    flatten,
    new_model,
    partition_update,
    plan_privacy,
    train_in_process,
)
from privrec_pipeline.training.model import ItemModel, ModelConfig
from privrec_pipeline.training.secure_random import SecureRandom

V = 40


def _histories(n_users: int, seed: int = 0, max_len: int = 8) -> Histories:
    rng = np.random.default_rng(seed)
    rows = [rng.choice(V, size=int(rng.integers(1, max_len + 1)), replace=False).tolist() for _ in range(n_users)]
    weights = [rng.uniform(0.5, 3.0, size=len(r)).tolist() for r in rows]
    return Histories.from_lists(rows, weights)


K = 5  # categories of the model with a category component (item j in category j % K)


def _model(dropout: float = 0.0, seed: int = 1, categories: bool = False) -> ItemModel:
    if categories:
        model = ItemModel(ModelConfig(vocab_size=V, dim=8, input_dropout=dropout, init_scale=0.5, categories=K),
                          seed=seed, item_category=np.arange(V) % K)
    else:
        model = ItemModel(ModelConfig(vocab_size=V, dim=8, input_dropout=dropout, init_scale=0.5), seed=seed)
    with torch.no_grad():  # non-trivial pooling logits and biases (and category parameters)
        model.pool_logit.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        model.item_out.bias.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        if categories:
            model.cat_in.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
            model.cat_bias.weight.normal_(0, 1, generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("categories", [False, True], ids=["items", "items+categories"])
@pytest.mark.parametrize("keep", [1.0, 0.5], ids=["all-inputs", "input-dropout"])
def test_closed_form_norms_equal_autograd_per_user_gradients(categories, keep):
    model, h = _model(categories=categories), _histories(12)
    if categories:
        assert [n for n, _ in model.named_parameters()][:4] == ["item_in.weight", "pool_logit.weight",
                                                                "item_out.weight", "item_out.bias"]
    batch = Batch(*h.batch(np.arange(h.users)))
    losses, cache = user_losses(model, batch, torch.Generator().manual_seed(7), keep=keep)
    closed = per_user_grad_norms(model, batch, cache)
    for u in range(h.users):
        model.zero_grad()
        losses[u].backward(retain_graph=True)
        exact = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
        assert float(closed[u]) == pytest.approx(exact, rel=1e-4)


def _summed_gradient(model: ItemModel, h: Histories, clip: float) -> torch.Tensor:
    batch = Batch(*h.batch(np.arange(h.users)))
    dp_gradient(model, batch, clip_norm=clip, noise_std=0.0, denominator=1.0, generator=torch.Generator().manual_seed(0),
                noise=None)
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


@pytest.mark.parametrize("categories", [False, True], ids=["items", "items+categories"])
def test_clipping_bounds_any_users_influence_even_adversarial_ones(categories):
    clip = 0.7
    normal = _histories(20)
    # ... including one piling everything on one category (items 0, 5, 10, ... are category 0)
    adversaries = Histories.from_lists([list(range(V)), [5], [7, 8], list(range(0, V, K))],
                                       [[100.0] * V, [1e6], [1e-6, 1e6], [1e3] * len(range(0, V, K))])
    model = _model(categories=categories)
    without = _summed_gradient(model, normal, clip)
    for a in range(adversaries.users):
        rows = [normal.row(u).tolist() for u in range(normal.users)] + [adversaries.row(a).tolist()]
        weights = [normal.weights[normal.indptr[u]:normal.indptr[u + 1]].tolist() for u in range(normal.users)]
        weights.append(adversaries.weights[adversaries.indptr[a]:adversaries.indptr[a + 1]].tolist())
        with_adversary = _summed_gradient(model, Histories.from_lists(rows, weights), clip)
        assert float((with_adversary - without).norm()) <= clip * (1 + 1e-4)


def test_noise_has_the_calibrated_standard_deviation():
    model, h = _model(), _histories(1)
    batch = Batch(*h.batch(np.arange(1)))
    grads = []
    for key in (b"1" * 32, b"2" * 32):
        dp_gradient(model, batch, clip_norm=1.0, noise_std=3.0, denominator=2.0, generator=None,
                    noise=SecureRandom(key))
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    difference = grads[0] - grads[1]  # the user's clipped gradient cancels: two noise draws remain
    expected = math.sqrt(2) * 3.0 / 2.0  # (sigma C) / denominator, for the difference of two draws
    n = difference.numel()
    assert n == sum(p.numel() for p in model.parameters())  # noise covers every trainable parameter
    assert float(difference.std()) == pytest.approx(expected, rel=5 / math.sqrt(2 * n))


def test_calibrated_noise_meets_the_target_and_matches_opacus_accountant():
    from opacus.accountants import RDPAccountant

    sigma = calibrate_noise(4.0, 1e-6, 0.05, 200)
    assert epsilon_for(sigma, 0.05, 200, 1e-6) == pytest.approx(4.0, rel=1e-3)
    assert epsilon_for(sigma * 1.05, 0.05, 200, 1e-6) < 4.0 < epsilon_for(sigma * 0.95, 0.05, 200, 1e-6)
    opacus = RDPAccountant()
    opacus.history = [(sigma, 0.05, 200)]
    assert opacus.get_epsilon(1e-6) == pytest.approx(4.0, rel=0.03)  # an independent implementation


def test_plan_reports_each_partition_and_the_worst_case():
    config = TrainConfig(mode="local", epsilon=2.0, rounds=2, local_steps=3, batch_size=10)
    plan = plan_privacy(config, [100, 50, 80])
    assert plan.steps == 6 and plan.sampling_rates == [0.1, 0.2, 0.125]
    assert plan.epsilon == max(plan.epsilon_per_partition) == pytest.approx(2.0, rel=1e-3)
    assert plan.epsilon_per_partition[0] < plan.epsilon_per_partition[2] < plan.epsilon_per_partition[1]
    distributed = plan_privacy(TrainConfig(mode="distributed", epsilon=2.0, rounds=6, batch_size=23), [100, 50, 80])
    assert distributed.steps == 6 and distributed.sampling_rates == [0.1] * 3


def _keys(partitions: int, run: str = "run-1", round_index: int = 0):
    secrets = [bytes([k + 1]) * 32 for k in range(partitions)]
    keys = [secure_agg.RoundKeys.derive(secrets[k], run, round_index, k) for k in range(partitions)]
    return keys, {k: keys[k].public_bytes() for k in range(partitions)}


def test_a_masked_update_is_uniform_and_the_sum_is_exact_within_quantization():
    from scipy import stats

    rng = np.random.default_rng(0)
    updates = {k: rng.normal(0, 0.1, 50_000) for k in range(3)}
    keys, public = _keys(3)
    masked = {k: secure_agg.mask_update(updates[k], keys[k], public, "run-1", 0) for k in range(3)}
    # A single masked vector: uniform over Z_2^64 (Kolmogorov-Smirnov on its value / 2^64).
    uniform = masked[0].astype(np.float64) / 2.0**64
    assert stats.kstest(uniform, "uniform").pvalue > 1e-3
    assert np.corrcoef(uniform, updates[0])[0, 1] == pytest.approx(0.0, abs=0.03)
    total = secure_agg.aggregate(masked, 3)
    plain = sum(updates.values())
    assert np.abs(total - plain).max() <= 3 * 2.0 ** -(secure_agg.FRACTION_BITS + 1) + 1e-12


def test_secure_aggregation_fails_closed_and_retries_mask_identically():
    keys, public = _keys(3)
    update = np.ones(10)
    masked = {k: secure_agg.mask_update(update, keys[k], public, "run-1", 0) for k in range(3)}
    with pytest.raises(secure_agg.SecureAggregationError, match=r"partition\(s\) \[1\] are missing"):
        secure_agg.aggregate({0: masked[0], 2: masked[2]}, 3)
    again, _ = _keys(3)  # a retried task derives the same key pair from its secret
    assert np.array_equal(secure_agg.mask_update(update, again[1], public, "run-1", 0), masked[1])
    next_round, public_next = _keys(3, round_index=1)
    assert not np.array_equal(secure_agg.mask_update(update, next_round[1], public_next, "run-1", 1), masked[1])
    with pytest.raises(secure_agg.SecureAggregationError, match="out of range"):
        secure_agg.mask_update(np.array([1e12]), keys[0], public, "run-1", 0)
    assert "private" not in repr(keys[0]) and "PrivateKey" not in repr(keys[0])


def test_retries_reproduce_the_update_and_the_noise_is_keyed_by_the_partition_secret():
    h = _histories(30)
    config = TrainConfig(mode="local", epsilon=3.0, rounds=2, local_steps=2, batch_size=10, dim=8)
    plan = plan_privacy(config, [h.users])
    start = flatten(new_model(config, V))

    def update(round_index: int = 0, secret: bytes = b"s" * 32, run_id: str = "run-1") -> np.ndarray:
        return partition_update(config, plan, start, V, h, round_index=round_index, partition=0, partitions=1,
                                secret=secret, run_id=run_id)[0]

    assert np.array_equal(update(), update())  # a retried task
    assert not np.array_equal(update(), update(round_index=1))
    assert not np.array_equal(update(), update(run_id="run-2"))  # another run: other noise
    # The noise is keyed by the partition's secret, not by anything published (the config's seed).
    assert not np.array_equal(update(), update(secret=b"t" * 32))


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_step_that_samples_nobody_is_pure_noise_of_the_planned_scale(mode):
    """Poisson sampling can pick no user at all (likely on a small partition): the step must still
    add the planned noise, since the accountant counts every step, even the first of a round."""
    from dataclasses import replace

    h = _histories(30, seed=3)
    tolerance = {"collusion_tolerance": 0} if mode == "distributed" else {}
    config = TrainConfig(mode=mode, epsilon=3.0, rounds=1, local_steps=1, batch_size=10, dim=8, **tolerance)
    plan = replace(plan_privacy(config, [h.users] * 3), sampling_rates=[1e-12] * 3)  # nobody is ever sampled
    start = flatten(new_model(config, V))
    update, stats = partition_update(config, plan, start, V, h, round_index=0, partition=0, partitions=3,
                                     secret=b"s" * 32, run_id="r")
    assert stats["sampled"] == 0 and np.isfinite(update).all()
    if mode == "distributed":  # the update is minus the noise share (t = 0): N(0, (sigma C / sqrt(3))^2) / (q N)
        expected = plan.noise_multiplier * config.clip_norm / math.sqrt(3) / (1e-12 * 3 * h.users)
        assert np.std(update) == pytest.approx(expected, rel=0.05)
    else:  # a local Adam step on a pure-noise gradient moves every parameter by about the learning rate
        assert np.abs(update).mean() == pytest.approx(config.local_lr, rel=0.2)


@pytest.mark.parametrize("mode", ["local", "distributed", "nonprivate"])
def test_federated_training_runs_through_secure_aggregation(mode):
    shards = [_histories(40, seed=1), _histories(30, seed=2)]
    config = TrainConfig(mode=mode, epsilon=8.0, rounds=2, local_steps=3, batch_size=10, dim=8)
    result = train_in_process(config, shards, V, run_id="test")
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert len(result.history) == 2 and result.plan.mode == mode
    if mode != "nonprivate":
        assert result.plan.epsilon <= 8.0 * 1.001 and result.plan.noise_multiplier > 0


def test_metrics_follow_the_protocol_on_a_vocabulary_smaller_than_k():
    from privrec_pipeline.training.evaluation import Split, metrics

    # 3 items: user 0 trained on item 0, tests item 2; user 1 trained on item 1, tests items 0 and 2.
    split = Split(Histories.from_lists([[0], [1]]), [np.array([2]), np.array([0, 2])], vocab_size=3)
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.9, 0.8]])  # train items are excluded before ranking
    m = metrics(lambda users: scores[torch.as_tensor(users)], split)
    # user 0 ranks [1, 2]: its test item at rank 2; user 1 ranks [2, 0]: both test items.
    assert m["recall@20"] == pytest.approx(1.0) and m["hr@10"] == pytest.approx(1.0)
    idcg1 = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + idcg1 / idcg1) / 2)


def test_bad_training_settings_name_the_field():
    with pytest.raises(ConfigurationError, match="TrainConfig: mode must be one of"):
        TrainConfig(mode="central")
    with pytest.raises(ConfigurationError, match="TrainConfig: epsilon must be positive"):
        TrainConfig(epsilon=0)
    with pytest.raises(ConfigurationError, match="every partition needs at least one user"):
        plan_privacy(TrainConfig(), [10, 0])


def _pure_noise_shares(config: TrainConfig, partitions: int, rounds: int) -> tuple[np.ndarray, float]:
    """Every partition's noise share (nobody sampled: the update is minus share / (q N)), times
    q N, for ``rounds`` rounds: an array [rounds, partitions, coordinates]; and sigma."""
    from dataclasses import replace

    h = _histories(10, seed=4)
    q = 1e-9
    plan = replace(plan_privacy(config, [h.users] * partitions), sampling_rates=[q] * partitions)
    start = flatten(new_model(config, V))
    total = partitions * h.users
    shares = np.array([[-partition_update(config, plan, start, V, h, round_index=r, partition=k,
                                          partitions=partitions, secret=bytes([k + 1]) * 32,
                                          run_id="run-1")[0] * (q * total)
                        for k in range(partitions)] for r in range(rounds)])
    return shares, plan.noise_multiplier


@pytest.mark.parametrize("tolerance", [0, 1, 3])
def test_any_p_minus_t_honest_noise_shares_carry_the_full_noise(tolerance):
    """Distributed DP with t colluding (or noise-dropping) partitions out of P = 4: the shares of
    the P - t honest ones must still sum to N(0, sigma^2 C^2) per coordinate. Before the
    collusion tolerance each share had variance sigma^2 C^2 / P: P - t shares fell short."""
    partitions, clip = 4, 0.3
    config = TrainConfig(mode="distributed", epsilon=2.0, rounds=1, batch_size=400, dim=8, clip_norm=clip,
                         collusion_tolerance=tolerance)  # (q = 1 in the plan: a quick calibration)
    shares, sigma = _pure_noise_shares(config, partitions, rounds=6)
    honest = shares[:, tolerance:, :].sum(axis=1).ravel()  # any P - t of them: the last ones
    draws = honest.size  # 6 rounds x 720 coordinates
    expected = sigma**2 * clip**2  # the variance the accountant assumes for the sum
    assert honest.var() == pytest.approx(expected, rel=5 * math.sqrt(2 / draws))
    single = shares[:, 0, :].ravel()  # one share: sigma^2 C^2 / (P - t)
    assert single.var() == pytest.approx(expected / (partitions - tolerance), rel=5 * math.sqrt(2 / draws))


def test_by_default_every_share_alone_carries_the_full_noise_and_the_accounting_is_sigmas():
    partitions, clip = 3, 0.3
    config = TrainConfig(mode="distributed", epsilon=2.0, rounds=1, batch_size=400, dim=8, clip_norm=clip)
    assert config.collusion_tolerance is None
    shares, sigma = _pure_noise_shares(config, partitions, rounds=4)
    for k in range(partitions):
        assert shares[:, k, :].var() == pytest.approx(sigma**2 * clip**2, rel=5 * math.sqrt(2 / shares[:, k].size))
    sizes = [100, 120, 90]
    default = plan_privacy(config, sizes)
    assert (default.partitions, default.collusion_tolerance) == (3, 2)
    assert default.noise_std_per_partition == pytest.approx(default.noise_multiplier * clip)
    from dataclasses import replace

    split = plan_privacy(replace(config, collusion_tolerance=0), sizes)
    # The ledger's epsilon is sigma's whatever t: t only states who must be honest for it to hold.
    assert (split.noise_multiplier, split.epsilon) == (default.noise_multiplier, default.epsilon)
    assert split.noise_std_per_partition == pytest.approx(default.noise_multiplier * clip / math.sqrt(3))
    local = plan_privacy(TrainConfig(mode="local", epsilon=2.0, rounds=1, local_steps=2, batch_size=400,
                                     clip_norm=clip), sizes)
    assert local.collusion_tolerance == 2 and local.noise_std_per_partition == pytest.approx(local.noise_multiplier * clip)


def test_an_impossible_collusion_tolerance_fails_naming_the_field_and_p():
    with pytest.raises(ConfigurationError, match=r"collusion_tolerance must be in 0\.\.2 for P = 3 partitions"):
        plan_privacy(TrainConfig(mode="distributed", collusion_tolerance=3), [10, 10, 10])
    with pytest.raises(ConfigurationError, match="TrainConfig: collusion_tolerance must be an integer >= 0"):
        TrainConfig(mode="distributed", collusion_tolerance=-1)
    with pytest.raises(ConfigurationError, match="TrainConfig: collusion_tolerance applies to distributed mode only"):
        TrainConfig(mode="local", collusion_tolerance=1)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_the_model_card_states_the_trust_model(mode):
    import datetime as dt
    from types import SimpleNamespace

    from privrec_pipeline.models import publish as pub
    from privrec_pipeline.models.evaluate import Evaluation

    tolerance = {"collusion_tolerance": 1} if mode == "distributed" else {}
    config = TrainConfig(mode=mode, epsilon=4.0, rounds=2, local_steps=2, batch_size=400, clip_norm=0.3, **tolerance)
    plan = plan_privacy(config, [100, 100, 100])
    from dataclasses import asdict

    population = {"partition_users": [100, 100, 100], "epsilon": 0.05, "release_id": 6}
    report = {"plan": plan.to_dict(), "config": asdict(config), "partitions": 3, "run_id": "run-1",
              "window": ["2026-01-01"], "vocabulary_size": 40, "population": population}
    metrics = {"recall@20": 0.1, "ndcg@10": 0.1, "hr@10": 0.1}
    dp = {"candidate": metrics, "dp_popularity": {"recall@20": 0.1}, "published": None, "published_version": None,
          "gains": {"dp_popularity": {"weight": 1.0, "mean": 0.01, "lower": 0.004}}, "confidence": 0.95,
          "epsilon": 0.2, "statistics": [{"name": "gain dp_popularity", "sensitivity": 1.0, "epsilon": 0.14,
                                          "weight": 1.0, "scale": 1 / 0.14}],
          "population": 300.0, "release_id": 8, "status": "new"}
    evaluation = Evaluation(dp, {}, True, "ok")
    release = SimpleNamespace(id=7, epsilon=plan.epsilon, delta=plan.delta)
    spend = SimpleNamespace(start=dt.date(2026, 1, 1), end=dt.date(2026, 1, 30), epsilon=4.0, basic_epsilon=4.0,
                            policy=SimpleNamespace(epsilon=10.0, delta=1e-5), releases=[release])
    manifest = {"params": {"max_items_per_user": 50}, "days_used": ["2026-01-01"], "releases": [1]}
    card = pub.model_card("m", "v", report, evaluation, release, spend, manifest)
    trust = card["privacy"]["trust_model"]
    text = pub.model_card_markdown(card)
    assert "can poison the sum" in text and "norm cannot be verified" in text
    # The sampling rates come from the DP counts, and the model's guarantee composes both releases.
    assert card["privacy"]["epsilon_with_population"] == pytest.approx(plan.epsilon + 0.05)
    assert "batch / DP partition count 100, 100, 100" in text and "ledger release 6" in text
    # The gate's evaluation: its epsilon, the DP population it was chosen for, the gain.
    assert "epsilon 0.2, chosen for a DP population of 300 users (ledger release 8)" in text
    assert "| dp popularity | 1 | +0.0100 | +0.0040 |" in text
    if mode == "local":
        assert trust["collusion_tolerance"] == 2
        assert "differentially private by itself" in text and "no trust in the aggregator" in text
    else:
        assert (trust["mode"], trust["partitions"], trust["collusion_tolerance"]) == ("distributed", 3, 1)
        assert "distributed mode, P = 3, t = 1" in text
        assert "at most t = 1 of the 3 partitions collude with the aggregator" in text
        assert trust["noise_std_per_partition"] == pytest.approx(plan.noise_multiplier * 0.3 / math.sqrt(2))
