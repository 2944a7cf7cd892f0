"""Evaluate a candidate model before publishing: metrics and the quality gate.

- Metrics under the DESIGN.md protocol on the run's hold-out (every user with >= 5 items:
  history -> test items): the candidate, the DP popularity baseline (the noisy user counts
  of the window's DP releases: post-processing, no extra budget) and the published model.
  Computed exactly for the operator's record, and released with DP
  (``models.dp_evaluation``) for the gate and the model card.
- Gate (``decide``): publish only if the candidate's Recall@20 beats DP popularity's and
  is not worse than the published model's by more than ``tolerance`` (relative), each shown
  at ``confidence`` by the lower bound of a DP paired gain: a function of the DP release only.

The privacy audit of a model is the training run's one-run audit (``training.canaries``): its
result is in the candidate's training.json and the model card, and a run whose audit refutes
its epsilon is never published (``publish``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privrec_pipeline.training.evaluation import Split, per_user_metrics, popularity_scores
from privrec_pipeline.training.model import ItemModel


@dataclass(frozen=True)
class GateSettings:
    tolerance: float = 0.05
    """Largest relative drop of Recall@20 against the published model that still publishes."""
    min_gain_over_dp_popularity: float = 0.0
    """The candidate's Recall@20 must exceed DP popularity's x (1 + this); -1 disables the check."""
    epsilon: float | None = None
    """Epsilon of the DP evaluation release (``models.dp_evaluation``) the gate and the card
    use; unset: chosen from the DP population so that the gate resolves ``resolution``."""
    resolution: float = 0.01
    """With the epsilon unset: the Recall@20 gain (a mean over the population) the gate's
    lower confidence bound gives up to the noise."""
    confidence: float = 0.95
    """A check passes when its gain is above its threshold at this confidence (over the noise)."""
    max_epsilon: float = 1.0
    """With the epsilon unset: the most the evaluation may spend."""

    def __post_init__(self) -> None:
        from privrec_pipeline.errors import ConfigurationError

        def positive(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")

        if self.epsilon is not None and not positive(self.epsilon):
            raise ConfigurationError(f"publish setting epsilon must be a positive number, not {self.epsilon!r}")
        if not positive(self.resolution) or not positive(self.max_epsilon):
            raise ConfigurationError(f"publish settings resolution and max_epsilon must be positive, not "
                                     f"{self.resolution!r} and {self.max_epsilon!r}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigurationError(f"publish setting confidence must be in [0.5, 1), not {self.confidence!r}")
        if not self.min_gain_over_dp_popularity >= -1:
            raise ConfigurationError(f"publish setting min_gain_over_dp_popularity must be >= -1 (-1: off), not "
                                     f"{self.min_gain_over_dp_popularity!r}")


def gate_settings(tolerance: float, settings: dict[str, Any]) -> GateSettings:
    """The gate of a DAG run: ``publish_tolerance`` and the other ``publish_settings``."""
    from privrec_pipeline.errors import ConfigurationError
    from privrec_pipeline.settings import from_settings

    if "tolerance" in settings:
        raise ConfigurationError("the publish tolerance is the publish_tolerance Param, not a publish setting")
    return from_settings(GateSettings, {**settings, "tolerance": tolerance}, "publish setting")


@dataclass
class Evaluation:
    dp: dict[str, Any]  # the DP evaluation release (``DPEvaluation.to_dict``): what the gate and the card use
    exact: dict[str, Any]  # exact metrics and user counts: the operator's record only
    publish: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExactEvaluation:
    """Exact hold-out metrics (means and per user) and user counts: never published."""

    candidate: dict[str, np.ndarray]
    dp_popularity: dict[str, np.ndarray]
    published: dict[str, np.ndarray] | None
    users: dict[str, int]  # evaluated users, trained and held out

    def means(self) -> dict[str, Any]:
        def mean(values: dict[str, np.ndarray] | None) -> dict[str, float] | None:
            return None if values is None else {k: float(np.mean(v)) if len(v) else 0.0 for k, v in values.items()}

        return {"candidate": mean(self.candidate), "dp_popularity": mean(self.dp_popularity),
                "published": mean(self.published), "users": self.users}


def model_metrics(model: ItemModel, split: Split) -> dict[str, np.ndarray]:
    """Each user's metrics (``training.evaluation.per_user_metrics``)."""
    def scores(users: np.ndarray) -> torch.Tensor:
        items, mask, _ = split.train.batch(users)
        with torch.no_grad():
            return model(items, mask)

    return per_user_metrics(scores, split)


def evaluate(candidate: ItemModel, all_users: Split, trained: Split, held_out: Split, dp_counts: np.ndarray,
             published: ItemModel | None, published_split: Split | None = None) -> ExactEvaluation:
    """The exact evaluation; ``published_split``: the same users in the published model's
    vocabulary (if it differs)."""
    cand = model_metrics(candidate, all_users)
    pop = per_user_metrics(popularity_scores(dp_counts), all_users)
    pub = model_metrics(published, published_split or all_users) if published is not None else None
    return ExactEvaluation(cand, pop, pub, {"trained": trained.train.users, "held_out": held_out.train.users})


def decide(dp: Any, gate: GateSettings) -> tuple[bool, str]:
    """The publish decision from the DP evaluation (``DPEvaluation``) only: every check's gain
    (``dp.gains``) must be above 0 at the release's confidence, i.e. its lower bound."""
    cand, pop, gains = dp.candidate["recall@20"], dp.dp_popularity["recall@20"], dp.gains
    level = f"at confidence {dp.confidence:g}"
    popularity = gains.get("dp_popularity")
    if popularity is not None and popularity["lower"] <= 0:
        times = "" if popularity["weight"] == 1 else f"{popularity['weight']:g} x "
        return False, (f"DP Recall@20 {cand:.4f} does not beat {times}DP popularity ({pop:.4f}) {level}: gain "
                       f"{popularity['mean']:+.4f}, lower bound {popularity['lower']:+.4f}")
    published = gains.get("published")
    if published is not None and published["lower"] <= 0:
        return False, (f"DP Recall@20 {cand:.4f} is not shown {level} to be at most {gate.tolerance:.0%} below the "
                       f"published model {dp.published_version} ({dp.published['recall@20']:.4f}): gain over "
                       f"{published['weight']:g} x its Recall@20 {published['mean']:+.4f}, lower bound "
                       f"{published['lower']:+.4f}")
    said = []
    if popularity is not None:
        said.append(f"beats DP popularity {level} (gain {popularity['mean']:+.4f}, lower bound "
                    f"{popularity['lower']:+.4f})")
    if published is not None:
        said.append(f"is within {gate.tolerance:.0%} of the published model")
    elif dp.published_version is None:
        said.append("no model published yet")
    return True, "; ".join(said) or "the gate's checks are off"


def dp_popularity_counts(release_items: list[Path], vocabulary: list[str]) -> np.ndarray:
    """Summed noisy user counts of the window's DP releases, per vocabulary item."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = {item: i for i, item in enumerate(vocabulary)}
    counts = np.zeros(len(vocabulary))
    for path in release_items:
        table = pq.read_table(pa.BufferReader(path.read_bytes()), columns=["item_id", "users"])
        for item, users in zip(table.column("item_id").to_pylist(), table.column("users").to_pylist(), strict=True):
            if item in index and users is not None:
                counts[index[item]] += users
    return counts
