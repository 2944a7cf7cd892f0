"""Evaluate a candidate model before publishing: metrics and the quality gate.

- Metrics under the DESIGN.md protocol on the run's hold-out (every user with >= 5 items:
  history -> test items): the candidate, the DP popularity baseline (the noisy user counts
  of the window's DP releases: post-processing, no extra budget) and the published model.
  Computed exactly for the operator's record, and released with DP
  (``models.dp_evaluation``) for the gate and the model card.
- Gate (``decide``): publish only if the candidate's DP Recall@20 beats DP popularity's and
  is not worse than the published model's by more than ``tolerance`` (relative): a function
  of the DP release only.

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
    epsilon: float = 0.2
    """Epsilon of the DP evaluation release (``models.dp_evaluation``) the gate and the card use."""


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
    """The publish decision from the DP evaluation (``DPEvaluation``) only."""
    cand, pop, pub, published_version = (dp.candidate["recall@20"], dp.dp_popularity["recall@20"], dp.published,
                                         dp.published_version)
    if gate.min_gain_over_dp_popularity > -1 and cand <= pop * (1 + gate.min_gain_over_dp_popularity):
        return False, f"DP Recall@20 {cand:.4f} does not beat DP popularity ({pop:.4f})"
    if pub is not None and cand < (1 - gate.tolerance) * pub["recall@20"]:
        return False, (f"DP Recall@20 {cand:.4f} is more than {gate.tolerance:.0%} below the published model "
                       f"{published_version} ({pub['recall@20']:.4f})")
    return True, ("beats DP popularity" + (f" and is within {gate.tolerance:.0%} of the published model"
                                           if pub is not None else "; no model published yet"))


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
