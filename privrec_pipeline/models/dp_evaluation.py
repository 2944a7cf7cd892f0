"""DP evaluation metrics: what the publish gate decides on and the model card shows.

Exact hold-out metrics are functions of the users' data, and so is a publish decision made
from them (model selection on private data: Papernot & Steinke 2022, "Hyperparameter tuning
with Renyi differential privacy"). So the evaluation is a release of its own, accounted in
the ledger before it is computed (release key ``evaluation-r<training release id>``, the
training run's window; one per candidate, reused by every rerun).

What is released (``plan``), each a sum over the hold-out users of a per-user value:

- the gate's **paired gains**, one per check of the gate: the candidate's Recall@20 minus
  ``w`` times DP popularity's (``w = 1 + min_gain_over_dp_popularity``) and, when a model is
  published, minus ``w = 1 - tolerance`` times the published model's. Per user the gain lies
  in [-max(w, 0), 1 + max(-w, 0)], so adding or removing one user moves its sum by at most
  ``sensitivity(w) = max(w, 1)`` for w >= 0 and ``1 - w`` below. A paired difference over the
  same users needs one noisy sum where two separate means would each carry the noise;
- the card's numbers: the candidate's Recall@20, NDCG@10 and HR@10, DP popularity's
  Recall@20, the published model's Recall@20 and the user count (each user value in [0, 1]:
  sensitivity 1).

Each statistic gets PyDP's Laplace mechanism with its own epsilon and scale = sensitivity /
epsilon (pure epsilon-DP, Dwork & Roth 2014, Thm 3.6); the release's epsilon is their sum
(basic composition, Dwork & Roth 2014, Thm 3.14), and the ledger is told every statistic as
its own component. The gains share ``GATE_SHARE`` of the epsilon in proportion to their
sensitivities (so all have the same noise scale); the card's numbers share the rest equally.

The gate (``models.evaluate.decide``) passes a check when the one-sided lower confidence
bound of its gain, noisy sum - b ln(1 / (2 (1 - confidence))) (the Laplace(b) quantile:
P(noise < -t) = exp(-t / b) / 2), is above 0: a candidate no better than the threshold passes
with probability at most 1 - confidence over the noise. All of it is post-processing of the
release. The epsilon is either set or chosen so that the bound's margin, as a mean over the
population, is at most ``resolution`` (``choose_epsilon``); the population is the training
run's DP partition counts (a committed release: public), never an exact count.

The noise is drawn when the release is computed and not written before it is committed, so a
retry after a crash draws again under the same charge (nothing of the first draw left the
process); after the commit every rerun reads the committed values.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privrec_pipeline.errors import ConfigurationError

CANDIDATE = ("recall@20", "ndcg@10", "hr@10")
GATE_SHARE = 0.7
"""Share of the release's epsilon that goes to the gate's gains (the rest: the card's numbers)."""
MIN_EPSILON = 0.2
"""The smallest chosen epsilon: the card's numbers stay readable on a large population."""
POPULARITY_GAIN, PUBLISHED_GAIN = "gain dp_popularity", "gain published"


def release_key(training_release: int) -> str:
    return f"evaluation-r{training_release}"


def sensitivity(weight: float) -> float:
    """Largest change of a sum of per-user ``c - weight x b`` (c, b in [0, 1]) when one user
    is added or removed."""
    return max(weight, 1.0) if weight >= 0 else 1.0 - weight


@dataclass(frozen=True)
class Statistic:
    name: str  # "gain dp_popularity", "gain published", "<model> <metric>" or "users"
    sensitivity: float
    epsilon: float
    weight: float | None = None  # a gain's w

    @property
    def scale(self) -> float:
        return self.sensitivity / self.epsilon


def margin(scale: float, confidence: float) -> float:
    """t with P(Laplace(scale) < -t) = 1 - confidence (one-sided, for confidence >= 1/2)."""
    return scale * math.log(1.0 / (2.0 * (1.0 - confidence)))


def gains(published: bool, min_gain: float, tolerance: float) -> dict[str, float]:
    """The gate's gains and their weights w (a check turned off has none)."""
    out = {POPULARITY_GAIN: 1.0 + min_gain} if min_gain > -1 else {}
    if published:
        out[PUBLISHED_GAIN] = 1.0 - tolerance
    return out


def card_statistics(published: bool) -> list[str]:
    return ([f"candidate {m}" for m in CANDIDATE] + ["dp_popularity recall@20"]
            + (["published recall@20"] if published else []) + ["users"])


def choose_epsilon(weights: dict[str, float], population: float, resolution: float, confidence: float,
                   max_epsilon: float) -> float:
    """The release's epsilon at which every gain's margin, as a mean over ``population`` users,
    is ``resolution``: the gains' epsilon e_G = sum of sensitivities x ln(1 / (2 (1 -
    confidence))) / (population x resolution), then e_G / GATE_SHARE, within [MIN_EPSILON,
    max_epsilon]."""
    if not weights:
        return min(MIN_EPSILON, max_epsilon)
    total = sum(sensitivity(w) for w in weights.values())
    gate = total * margin(1.0, confidence) / (max(population, 1.0) * resolution)
    return float(min(max(gate / GATE_SHARE, MIN_EPSILON), max_epsilon))


def plan(weights: dict[str, float], published: bool, epsilon: float) -> list[Statistic]:
    """The released statistics in order (gains first, the user count last) with their epsilons."""
    card = card_statistics(published)
    share = GATE_SHARE if weights else 0.0
    total = sum(sensitivity(w) for w in weights.values())
    stats = [Statistic(name, sensitivity(w), share * epsilon * sensitivity(w) / total, w)
             for name, w in weights.items()]
    return stats + [Statistic(name, 1.0, (1.0 - share) * epsilon / len(card)) for name in card]


@dataclass(frozen=True)
class DPEvaluation:
    candidate: dict[str, float]  # Recall@20, NDCG@10, HR@10 (noisy means)
    dp_popularity: dict[str, float]  # Recall@20
    published: dict[str, float] | None  # Recall@20 of the published model, when there is one
    published_version: str | None
    gains: dict[str, dict[str, float]]  # per gate check: weight, mean, lower (bound at ``confidence``)
    confidence: float
    epsilon: float
    statistics: list[dict[str, Any]]  # name, sensitivity, epsilon, scale of each noisy sum
    population: float | None  # the DP user count the epsilon was chosen for (None: set by hand)
    release_id: int
    status: str  # the ledger's: "new", "resume" or "reuse"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exact_sums(stats: list[Statistic], candidate: dict[str, np.ndarray], dp_popularity: dict[str, np.ndarray],
               published: dict[str, np.ndarray] | None) -> list[float]:
    """The exact sum of every statistic of ``stats``, each user's metric clipped to [0, 1]."""
    values = {f"candidate {m}": candidate[m] for m in CANDIDATE} | {"dp_popularity recall@20":
                                                                     dp_popularity["recall@20"]}
    if published is not None:
        values["published recall@20"] = published["recall@20"]
    users = {len(v) for v in values.values()}
    if len(users) != 1:
        raise ValueError(f"per-user metrics of different lengths {sorted(users)}: not the same users")
    clipped = {k: np.clip(v, 0.0, 1.0) for k, v in values.items()}
    other = {POPULARITY_GAIN: "dp_popularity recall@20", PUBLISHED_GAIN: "published recall@20"}
    out = []
    for s in stats:
        if s.name == "users":
            out.append(float(users.pop()))
        elif s.weight is not None:
            if other[s.name] not in clipped:
                raise ValueError(f"{s.name}: no {other[s.name]} to compare with")
            out.append(float((clipped["candidate recall@20"] - s.weight * clipped[other[s.name]]).sum()))
        else:
            out.append(float(clipped[s.name].sum()))
    return out


def noisy_sums(stats: list[Statistic], sums: list[float]) -> list[float]:
    """Every sum with PyDP's Laplace noise of its statistic's sensitivity and epsilon."""
    from privrec_pipeline.privacy.mechanisms import LaplaceNoise

    return [LaplaceNoise(s.epsilon, s.sensitivity).sum(value) for s, value in zip(stats, sums, strict=True)]


def noisy_means(stats: list[Statistic], noisy: list[float], confidence: float) -> tuple[dict, dict]:
    """Post-processing of the noisy sums: the card's means (noisy sum / noisy count, in [0, 1])
    and every gain's mean and lower bound at ``confidence``."""
    count = max(noisy[-1], 1.0)
    means: dict[str, dict[str, float]] = {}
    gains: dict[str, dict[str, float]] = {}
    for s, value in zip(stats[:-1], noisy[:-1], strict=True):
        if s.weight is not None:
            gains[s.name.split(" ")[1]] = {"weight": s.weight, "mean": value / count,
                                           "lower": (value - margin(s.scale, confidence)) / count}
        else:
            model, metric = s.name.split(" ")
            means.setdefault(model, {})[metric] = min(max(value / count, 0.0), 1.0)
    return means, gains


def release_evaluation(ledger: Any, window: tuple[dt.date, dt.date], training_release: int,
                       metrics: tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray] | None],
                       published: str | None, gate: Any, population: float | None, *, run_id: str,
                       dag_id: str, force: bool, parameters: dict[str, Any]) -> DPEvaluation:
    """Reserve, compute and commit (or reuse) the noisy evaluation of one candidate against
    DP popularity and the ``published`` model version (if any); ``metrics``: the per-user
    metrics of the candidate, DP popularity and the published model; ``gate``: the
    ``GateSettings``; ``population``: the DP user count an unset epsilon is chosen for. A
    committed release is reused as it was made (the published version it compared with,
    whatever was published since); ``force`` evaluates, and pays, again."""
    from privrec_pipeline.privacy.accounting import Component

    weights = gains(published is not None, gate.min_gain_over_dp_popularity, gate.tolerance)
    if gate.epsilon is not None:
        epsilon, population = float(gate.epsilon), None
    elif population is None:
        raise ConfigurationError("GateSettings: no epsilon set and no DP population to choose it from")
    else:
        epsilon = choose_epsilon(weights, population, gate.resolution, gate.confidence, gate.max_epsilon)
    stats = plan(weights, published is not None, epsilon)
    described = [asdict(s) for s in stats]
    reservation = ledger.reserve(
        release_key(training_release), window[0], window[1],
        [Component("laplace", noise_multiplier=1.0 / s.epsilon, label=f"evaluation {s.name}") for s in stats],
        epsilon=epsilon, delta=0.0, dag_id=dag_id, run_id=run_id, force=force,
        parameters={**parameters, "statistics": described, "published_version": published, "epsilon": epsilon,
                    "population": population})
    release = reservation.release
    if reservation.status == "reuse":
        result = release.result or {}
        committed, noisy = result.get("statistics") or [], result.get("noisy_sums") or []
        if not committed or len(noisy) != len(committed):
            raise ConfigurationError(
                f"the committed evaluation release {release.id} holds no usable values: rerun with force_release to "
                "evaluate (and pay for) the candidate again")
        committed_weights = {s["name"]: s["weight"] for s in committed if s.get("weight") is not None}
        wanted = gains(result.get("published_version") is not None, gate.min_gain_over_dp_popularity,
                       gate.tolerance)
        if committed_weights != wanted:
            raise ConfigurationError(
                f"the committed evaluation release {release.id} was made for the gate thresholds "
                f"{committed_weights}, this run's are {wanted}: rerun with force_release to evaluate (and pay for) "
                "the candidate again")
        stats = [Statistic(s["name"], s["sensitivity"], s["epsilon"], s.get("weight")) for s in committed]
        published, epsilon, population = result.get("published_version"), float(release.epsilon), \
            result.get("population")
    else:
        sums = exact_sums(stats, *metrics)
        noisy = noisy_sums(stats, sums)
        ledger.commit(release.id, {"statistics": described, "noisy_sums": noisy, "published_version": published,
                                  "population": population}, run_id=run_id)
    means, gain = noisy_means(stats, noisy, gate.confidence)
    return DPEvaluation(means["candidate"], means["dp_popularity"], means.get("published"), published, gain,
                        gate.confidence, epsilon, [{**asdict(s), "scale": s.scale} for s in stats], population,
                        release.id, reservation.status)
