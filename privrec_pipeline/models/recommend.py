"""Serving: a user's vector from that user's own history, then the top-k items.

Nothing about the user is stored: the history comes with the request, the user vector is
computed, used and dropped (privacy contract point 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.training.artifact import read_model
from privrec_pipeline.training.model import ItemModel

log = logging.getLogger(__name__)
LATEST = "LATEST"


def models_root(lake: str) -> Path:
    from privrec_pipeline import lake as lk

    return lk.path(lk.zone_uri(lake, "models"))


def resolve_version(lake: str, name: str, version: str = "latest") -> Path:
    """The folder of a published model version (``latest`` follows the LATEST pointer)."""
    root = models_root(lake) / name
    if version == "latest":
        pointer = root / LATEST
        if not pointer.exists():
            raise PrivrecError(f"no published model {name!r} in {models_root(lake)} (nothing was published yet)")
        version = pointer.read_text(encoding="utf-8").strip()
    folder = root / version
    if not (folder / "model.safetensors").exists():
        known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) if root.exists() else []
        raise PrivrecError(f"model {name!r} has no version {version!r}; published versions: {known or 'none'}")
    return folder


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    score: float


@dataclass
class Recommender:
    model: ItemModel
    items: list[str]
    index: dict[str, int]
    folder: Path

    @classmethod
    def load(cls, folder: Path) -> "Recommender":
        model, items, _ = read_model(folder)
        model.eval()
        return cls(model, items, {item: i for i, item in enumerate(items)}, folder)

    def recommend(self, history: list[str], k: int = 10) -> tuple[list[Recommendation], list[str]]:
        """Top-k items for a history of item ids, excluding the history; also the ignored ids
        (not in the DP vocabulary: the model knows nothing about them)."""
        if k < 1:
            raise PrivrecError(f"k must be at least 1, not {k}")
        cleaned = [h.strip() for h in history if h and h.strip()]
        if not cleaned:
            raise PrivrecError("the history is empty: give at least one item id")
        known = list(dict.fromkeys(i for i in cleaned if i in self.index))
        ignored = [i for i in dict.fromkeys(cleaned) if i not in self.index]
        if ignored:
            log.warning("ignored %d item(s) outside the model's DP vocabulary: %s", len(ignored), ", ".join(ignored[:10]))
        if not known:
            raise PrivrecError(f"none of the {len(cleaned)} history item(s) is in the model's vocabulary "
                               f"({len(self.items)} items); nothing to base recommendations on")
        ids = torch.tensor([[self.index[i] for i in known]])
        with torch.no_grad():
            scores = self.model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        scores[ids[0]] = float("-inf")  # never recommend what the user already has
        top = torch.topk(scores, min(k, len(self.items) - len(known)))
        return [Recommendation(self.items[int(i)], float(s)) for s, i in zip(top.values, top.indices, strict=True)
                if s > float("-inf")], ignored


def recommend_batch(recommender: Recommender, histories: dict[str, list[str]], k: int = 10) -> list[dict]:
    """Top-k for many histories (key -> item ids): rows of key, rank, item_id, score; keys whose
    history has no vocabulary item get no rows."""
    rows = []
    for key, history in sorted(histories.items()):
        try:
            recs, _ = recommender.recommend(history, k)
        except PrivrecError:
            continue
        rows += [{"key": key, "rank": r + 1, "item_id": rec.item_id, "score": rec.score} for r, rec in enumerate(recs)]
    return rows
