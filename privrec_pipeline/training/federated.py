"""Federated rounds over disjoint user partitions: one code path for every mode.

Per round, each partition k starts from the global model and runs ``local_steps`` steps on
its own users (Poisson-sampled with rate q_k), producing an update ``delta_k`` (new minus
old parameters); the aggregator only learns ``sum_k delta_k`` (secure aggregation) and
applies it with the server optimizer.

- ``local``: each step adds the full noise (sigma C), so every partition's update is DP by
  itself, accounted over rounds x local_steps steps at its own sampling rate; the run's
  guarantee is the worst partition's. Local optimizer Adam (fresh per round), server FedAvg
  (the mean of the updates). Under DP noise Adam's normalized step moves a coordinate by only
  about ``local_lr`` x signal / noise std per step towards the signal, so a DP run needs a larger
  ``local_lr`` than the non-private one (measured in ``benchmarks/training.py``). Keeping each
  partition's Adam moments across rounds (post-processing, no privacy cost) measured no better
  there, so a round starts a fresh Adam and the partition keeps no state between rounds.
- ``distributed``: one step per round; each partition adds N(0, sigma^2 C^2 / (P - t)), so
  any P - t honest shares together carry the full noise (central DP-SGD over all users,
  accounted over ``rounds`` steps at q = batch / all users), valid if at most t partitions
  (``collusion_tolerance``, default P - 1) collude with the aggregator or leave out their
  noise; the partition's update is minus its noisy gradient share and the server applies Adam
  to the sum (DP-FedAdam; Reddi et al. 2021, "Adaptive Federated Optimization"; optimizers
  are post-processing). A partition that sends nothing is not a dropout the sum tolerates:
  the secure aggregation has no dropout recovery, so the round fails (``secure_agg.aggregate``).
- ``nonprivate``: the ``local`` path without clipping or noise (the baseline).

Randomness is keyed by (the partition's secret, run, round, partition): a retried partition
task produces the same update, another run different noise. The key is secret on purpose:
noise anyone could regenerate (from a seed in the model card) could be subtracted, and the
guarantee would be void. ``seed`` in the config only initializes the model. Poisson sampling
and noise come from a ChaCha20 CSPRNG (``secure_random.SecureRandom``, with Opacus'
``secure_mode`` mitigation of floating-point attacks); input dropout, which the DP analysis
does not rely on, from a torch generator seeded from another key of the same secret.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.training.canaries import Canaries, CanaryBlock
from privrec_pipeline.training.data import Histories
from privrec_pipeline.training.dp import (
    Batch,
    add_noise,
    calibrate_noise,
    dp_gradient,
    epsilon_for,
    noise_std_share,
    plain_gradient,
)
from privrec_pipeline.training.model import ItemModel, ModelConfig
from privrec_pipeline.training.secure_random import SecureRandom

MODES = ("local", "distributed", "nonprivate")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "local"
    epsilon: float = 4.0
    delta: float = 1e-6
    rounds: int = 10
    local_steps: int = 10
    batch_size: int = 256
    """Expected users per step: per partition in local mode, in total in distributed mode."""
    clip_norm: float = 0.1
    """C. The loss is normalized per user, so user gradient norms are about 0.05-0.25 (measured on
    ml-latest-small at initialization): C near the median clips half the users and keeps the
    noise (sigma C) no larger than it must be."""
    dim: int = 64
    input_dropout: float = 0.5
    local_lr: float = 0.01
    server_lr: float = 0.01
    seed: int = 0
    """Initialization of the model (public); the noise is keyed by the partitions' secrets."""
    category_features: bool = True
    """With a vocabulary that maps items to catalog categories, give the model a category component
    (``ItemModel`` with categories): items nobody interacted with are scored by their category.
    False: the item-only model even when categories are known."""
    collusion_tolerance: int | None = None
    """t, distributed mode only: the guarantee holds if at most t of the P partitions collude
    with the aggregator or leave out their noise share; each partition adds N(0, sigma^2 C^2 /
    (P - t)). None: t = P - 1 (every share alone carries the full noise). Must be in 0..P-1."""
    population_epsilon: float = 0.05
    """Epsilon of the DP count of each partition's users the sampling rates are set from
    (``training.population``: its own ledger release, before the training release)."""
    content_prior: bool = False
    """Start both item tables from the catalog's text (titles, categories) encoded by the packaged
    all-MiniLM-L6-v2 (``content_prior``): public information, no privacy cost. Needs a catalog;
    measured in ``benchmarks/content_prior.py`` (it raised Recall@20 in every run there), off by
    default because encoding a large catalog takes minutes on a CPU."""

    audit_canaries: int = 1000
    """m: canaries of the one-run training audit inserted in every private run (``training.canaries``;
    they never touch the model's parameters and cost no budget); 0: no audit, else at least 20."""
    audit_confidence: float = 0.99
    """Confidence of the audit's epsilon lower bound; a bound above the claimed epsilon fails the run's audit."""

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ConfigurationError(f"TrainConfig: {name} {problem}, not {getattr(self, name)!r}")

        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}")
        if self.mode != "nonprivate" and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            fail("epsilon", "must be positive and finite")
        if not 0 < self.delta < 1:
            fail("delta", "must be in (0, 1)")
        for name in ("rounds", "local_steps", "batch_size", "dim"):
            if getattr(self, name) < 1:
                fail(name, "must be positive")
        for name in ("clip_norm", "local_lr", "server_lr"):
            if not getattr(self, name) > 0:
                fail(name, "must be positive")
        if not 0 <= self.input_dropout < 1:
            fail("input_dropout", "must be in [0, 1)")
        if isinstance(self.audit_canaries, bool) or not isinstance(self.audit_canaries, int) \
                or not (self.audit_canaries == 0 or self.audit_canaries >= 20):
            fail("audit_canaries", "must be 0 (no audit) or an integer >= 20")
        if not 0.5 <= self.audit_confidence < 1:
            fail("audit_confidence", "must be in [0.5, 1)")
        if not (self.population_epsilon > 0 and math.isfinite(self.population_epsilon)):
            fail("population_epsilon", "must be positive and finite")
        if self.collusion_tolerance is not None:
            if self.mode != "distributed":
                fail("collusion_tolerance", f"applies to distributed mode only (mode {self.mode!r} adds the full "
                                            "noise in every partition); leave it unset")
            if isinstance(self.collusion_tolerance, bool) or not isinstance(self.collusion_tolerance, int) \
                    or self.collusion_tolerance < 0:
                fail("collusion_tolerance", "must be an integer >= 0 (at most P - 1 for P partitions)")

    @property
    def steps_per_round(self) -> int:
        return 1 if self.mode == "distributed" else self.local_steps


@dataclass(frozen=True)
class PrivacyPlan:
    """Noise and accounting of a run, fixed before training starts (and reserved in the ledger)."""

    mode: str
    noise_multiplier: float  # sigma (0 when non-private)
    sampling_rates: list[float]  # per partition (the same rate everywhere in distributed mode)
    steps: int  # accounted steps per user
    epsilon_per_partition: list[float]
    epsilon: float  # the run's guarantee: the worst partition's (local) or the central one
    delta: float
    clip_norm: float
    partitions: int  # P
    collusion_tolerance: int | None  # t: DP holds if at most t partitions collude with the aggregator (None: nonprivate)
    noise_std_per_partition: float  # the std of the noise each partition adds per coordinate (before the denominator)
    population: list[int]  # the partition sizes q was set from (the DP counts in the pipeline); never exact counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_privacy(config: TrainConfig, partition_users: list[int]) -> PrivacyPlan:
    """Calibrate sigma for the target (epsilon, delta) from the partitions' sizes: in the
    pipeline the DP counts of ``training.population`` (q and the denominator then publish no
    exact size)."""
    if not partition_users or min(partition_users) < 1:
        raise ConfigurationError(f"every partition needs at least one user, got sizes {partition_users}")
    parties = len(partition_users)
    steps = config.rounds * config.steps_per_round
    if config.mode == "nonprivate":
        return PrivacyPlan("nonprivate", 0.0, [min(1.0, config.batch_size / n) for n in partition_users], steps,
                           [math.inf] * parties, math.inf, config.delta, math.inf, parties, None, 0.0,
                           list(partition_users))
    tolerance = parties - 1 if config.collusion_tolerance is None else config.collusion_tolerance
    if not 0 <= tolerance <= parties - 1:
        raise ConfigurationError(
            f"TrainConfig: collusion_tolerance must be in 0..{parties - 1} for P = {parties} partitions (at least "
            f"one partition must be honest), not {tolerance}: lower it or leave it unset (t = P - 1)")
    if config.mode == "local":
        rates = [min(1.0, config.batch_size / n) for n in partition_users]
    else:
        rates = [min(1.0, config.batch_size / sum(partition_users))] * parties
    sigma = calibrate_noise(config.epsilon, config.delta, max(rates), steps)
    per_partition = [epsilon_for(sigma, q, steps, config.delta) for q in rates]
    # Local mode: every partition adds the full noise to its own update (t = P - 1 by construction).
    noise = noise_std_share(sigma, config.clip_norm, parties, tolerance)
    return PrivacyPlan(config.mode, sigma, rates, steps, per_partition, max(per_partition), config.delta,
                       config.clip_norm, parties, tolerance, noise, list(partition_users))


def dropout_generator(secret: bytes, run_id: str, round_index: int, partition: int) -> torch.Generator:
    """The torch generator of the partition's input dropout in one round (not part of the DP
    analysis, so torch's Mersenne Twister is enough), seeded from its own key of the secret."""
    seed = int(SecureRandom.derive(secret, "dropout", run_id, round_index, partition).words(1)[0]) >> 1
    return torch.Generator().manual_seed(seed)


def new_model(config: TrainConfig, vocab_size: int, item_category: np.ndarray | None = None,
              item_init: torch.Tensor | None = None) -> ItemModel:
    """The model of a run; ``item_category`` (int [V], categories 0..K-1, K = its max + 1): the
    vocabulary's public item -> category map, used if ``config.category_features``;
    ``item_init`` ([V, dim]): public initial item vectors (``content_prior.item_init``)."""
    if item_category is not None and config.category_features and len(item_category):
        category = np.asarray(item_category, dtype=np.int64)
        return ItemModel(ModelConfig(vocab_size=vocab_size, dim=config.dim, input_dropout=config.input_dropout,
                                     categories=int(category.max()) + 1), seed=config.seed, item_category=category,
                         item_init=item_init)
    return ItemModel(ModelConfig(vocab_size=vocab_size, dim=config.dim, input_dropout=config.input_dropout),
                     seed=config.seed, item_init=item_init)


def flatten(model: ItemModel) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


def load_flat(model: ItemModel, flat: np.ndarray) -> None:
    size = sum(p.numel() for p in model.parameters())
    if flat.size != size:  # e.g. a model built with categories, a vector without (or the reverse)
        raise ConfigurationError(f"a parameter vector of {flat.size} values does not fit the model's {size} "
                                 f"({model.config})")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(torch.from_numpy(flat[offset:offset + n]).reshape(p.shape).to(p.dtype))
            offset += n


def partition_update(config: TrainConfig, plan: PrivacyPlan, global_params: np.ndarray, vocab_size: int,
                     shard: Histories, *, round_index: int, partition: int, partitions: int,
                     secret: bytes, run_id: str, item_category: np.ndarray | None = None,
                     canaries: Canaries | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """One partition's work in one round: its update (new - old parameters) and diagnostics.
    With ``canaries``, the parameter vector ends with their block (``training.canaries``)."""
    model = new_model(config, vocab_size, item_category)
    size = global_params.size - (canaries.count if canaries else 0)
    load_flat(model, global_params[:size])
    if partitions != plan.partitions:
        raise ConfigurationError(f"the plan was made for {plan.partitions} partitions, this round has {partitions}")
    random = SecureRandom.derive(secret, "noise", run_id, round_index, partition)  # sampling and noise (DP)
    block = None
    if canaries is not None and config.mode != "nonprivate":
        block = CanaryBlock(canaries, global_params[size:], secret=secret, run_id=run_id, round_index=round_index,
                            partition=partition, partitions=partitions)
    generator = dropout_generator(secret, run_id, round_index, partition) if config.input_dropout > 0 else None
    q = plan.sampling_rates[partition]
    # The expected batch from the plan's population (public or DP, Abadi et al. 2016's fixed lot
    # size), never the shard's exact size.
    denominator = q * (sum(plan.population) if config.mode == "distributed" else plan.population[partition])
    noise = plan.noise_std_per_partition
    params = [*model.parameters(), *([block.parameter] if block is not None else [])]
    optimizer = torch.optim.Adam(params, lr=config.local_lr) if config.mode != "distributed" else None
    stats = {"loss": 0.0, "clipped": 0.0, "sampled": 0.0}
    for _ in range(config.steps_per_round):
        sampled = np.flatnonzero(random.bernoulli(shard.users, q))  # Poisson sampling
        batch = Batch(*shard.batch(sampled)) if len(sampled) else None
        if config.mode == "nonprivate":
            if batch is None:
                continue
            step = plain_gradient(model, batch, generator)
        elif batch is None:  # nobody sampled: the step is pure noise, still taken (accounting assumes it)
            model.zero_grad(set_to_none=True)
            add_noise(model, random, noise, denominator)
            step = {"loss": 0.0, "clipped": 0.0}
        else:
            step = dp_gradient(model, batch, clip_norm=config.clip_norm, noise_std=noise, denominator=denominator,
                               generator=generator, noise=random)
        if block is not None:
            block.step_gradient(q, config.clip_norm, noise, denominator)
        if optimizer is not None:
            optimizer.step()
        stats["loss"] += step["loss"] / config.steps_per_round
        stats["clipped"] += step["clipped"] / config.steps_per_round
        stats["sampled"] += len(sampled) / config.steps_per_round
    if config.mode == "distributed":  # the update is minus the noisy gradient share
        update = -torch.cat([p.grad.reshape(-1) for p in params]).double().numpy()
    else:
        update = np.concatenate([flatten(model), block.values() if block is not None else global_params[size:]]) \
            - global_params
    return update, stats


@dataclass
class ServerState:
    """The global model and the server optimizer's moments (post-processing state)."""

    params: np.ndarray
    round: int = 0
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)


def apply_round(config: TrainConfig, state: ServerState, update_sum: np.ndarray, partitions: int) -> ServerState:
    """Apply the aggregated updates: FedAvg (local, nonprivate) or Adam on the sum (distributed)."""
    if config.mode != "distributed":
        return ServerState(state.params + update_sum / partitions, state.round + 1)
    grad = -update_sum
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = (state.m if state.m is not None else np.zeros_like(grad)) * beta1 + (1 - beta1) * grad
    v = (state.v if state.v is not None else np.zeros_like(grad)) * beta2 + (1 - beta2) * grad * grad
    t = state.round + 1
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    return ServerState(state.params - config.server_lr * m_hat / (np.sqrt(v_hat) + eps), t, m, v)


@dataclass
class TrainingResult:
    model: ItemModel
    plan: PrivacyPlan
    history: list[dict[str, float]]  # per round: mean loss and clipped share over partitions
    audit: Any = None  # the one-run audit (``one_run_audit.AuditResult``) of a private run with canaries


def canary_audit(config: TrainConfig, plan: PrivacyPlan, canaries: Canaries | None, params: np.ndarray):
    """The model's parameters (the canary block dropped) and the run's audit (None without canaries)."""
    if canaries is None:
        return params, None
    from privrec_pipeline.training.canaries import audit_run

    size = params.size - canaries.count
    if config.mode == "nonprivate":
        return params[:size], None
    return params[:size], audit_run(canaries, params[size:], plan.epsilon, plan.delta, config.audit_confidence)


def train_in_process(config: TrainConfig, shards: list[Histories], vocab_size: int, *, run_id: str = "local",
                     secure: bool = True, item_category: np.ndarray | None = None,
                     item_init: torch.Tensor | None = None, plan: PrivacyPlan | None = None) -> TrainingResult:
    """Every round of every partition in this process, through the same functions the DAG's
    tasks call (and, with ``secure``, through masked secure aggregation). ``item_init``: public
    initial item vectors of the global model (only its start: the rounds load its parameters);
    ``plan``: a run's plan (default: planned from the shards' sizes)."""
    import secrets as _secrets

    from privrec_pipeline.training import secure_agg

    partitions = len(shards)
    plan = plan or plan_privacy(config, [s.users for s in shards])
    canaries = Canaries.new(config.audit_canaries) if config.mode != "nonprivate" else None
    state = ServerState(np.concatenate([flatten(new_model(config, vocab_size, item_category, item_init)),
                                        np.zeros(canaries.count if canaries else 0)]))
    partition_secrets = [_secrets.token_bytes(32) for _ in range(partitions)]
    history = []
    for r in range(config.rounds):
        updates, stats = {}, []
        keys = [secure_agg.RoundKeys.derive(partition_secrets[k], run_id, r, k) for k in range(partitions)]
        public = {k: keys[k].public_bytes() for k in range(partitions)}
        for k, shard in enumerate(shards):
            delta, s = partition_update(config, plan, state.params, vocab_size, shard, round_index=r, partition=k,
                                        partitions=partitions, secret=partition_secrets[k], run_id=run_id,
                                        item_category=item_category, canaries=canaries)
            updates[k] = secure_agg.mask_update(delta, keys[k], public, run_id, r) if secure else delta
            stats.append(s)
        total = secure_agg.aggregate(updates, partitions) if secure else sum(updates.values())
        state = apply_round(config, state, total, partitions)
        history.append({k: float(np.mean([s[k] for s in stats])) for k in ("loss", "clipped", "sampled")})
    params, audit = canary_audit(config, plan, canaries, state.params)
    model = new_model(config, vocab_size, item_category)
    load_flat(model, params)
    return TrainingResult(model, plan, history, audit)
