"""Training histories in memory: one row per user, items as vocabulary indices.

Compressed rows (``indptr``, ``items``, ``weights``, like a CSR matrix) so a shard of a
million users is a few arrays; ``batch`` pads the selected users' rows into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Histories:
    indptr: np.ndarray  # int64 [users + 1]
    items: np.ndarray  # int64 vocabulary indices, distinct within a row
    weights: np.ndarray  # float32 event-type weights

    def __post_init__(self) -> None:
        if self.indptr[0] != 0 or self.indptr[-1] != len(self.items) or len(self.items) != len(self.weights):
            raise ValueError("Histories: indptr, items and weights do not line up")

    @property
    def users(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_lists(cls, rows: list[list[int]], weights: list[list[float]] | None = None) -> "Histories":
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.array([i for r in rows for i in r], dtype=np.int64)
        w = (np.array([x for r in weights for x in r], dtype=np.float32) if weights is not None
             else np.ones(len(items), dtype=np.float32))
        return cls(indptr, items, w)

    def row(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user]:self.indptr[user + 1]]

    def select(self, users: np.ndarray) -> "Histories":
        rows = [self.row(int(u)) for u in users]
        weights = [self.weights[self.indptr[u]:self.indptr[u + 1]] for u in users]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        w = np.concatenate(weights) if weights else np.zeros(0, dtype=np.float32)
        return Histories(indptr, items.astype(np.int64), w.astype(np.float32))

    def batch(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (items [B, L], mask [B, L], weights [B, L]) for the given user indices."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        width = int(lengths.max(initial=1)) or 1
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        index = np.where(mask, starts[:, None] + positions[None, :], 0)
        items = np.where(mask, self.items[index] if len(self.items) else 0, 0)
        weights = np.where(mask, self.weights[index] if len(self.weights) else 0.0, 0.0)
        return torch.from_numpy(items.astype(np.int64)), torch.from_numpy(mask), torch.from_numpy(
            weights.astype(np.float32))


@dataclass(frozen=True)
class Vocabulary:
    """The training vocabulary: item ids in index order and, when the lake has a catalog, the
    public item -> category map (``item_category`` int [V] indexing ``categories``)."""

    items: list[str]
    categories: list[str] | None = None
    item_category: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.categories is None) != (self.item_category is None):
            raise ValueError("Vocabulary: categories and item_category go together")
        if self.item_category is not None and (len(self.item_category) != len(self.items) or (
                len(self.items) and not 0 <= int(self.item_category.min()) <= int(self.item_category.max())
                < len(self.categories))):
            raise ValueError(f"Vocabulary: item_category must map {len(self.items)} items to "
                             f"0..{len(self.categories) - 1}")

    @property
    def size(self) -> int:
        return len(self.items)


CATEGORIES_FOLDER = "categories"


def read_vocabulary(folder, size: int | None = None) -> Vocabulary:
    """build_partitions' ``vocabulary/`` folder (item_index, item_id[, category_index]) and, if it
    has category indices, the sibling ``categories/`` folder (category_index, category)."""
    from privrec_pipeline import lake as lk

    folder = lk.path(folder)
    frame = lk.dataset(folder, format="parquet").to_table().to_pandas().sort_values("item_index")
    expected = len(frame) if size is None else size
    if frame["item_index"].tolist() != list(range(expected)):
        raise ValueError(f"vocabulary at {folder} does not index 0..{expected - 1}")
    items = frame["item_id"].tolist()
    if "category_index" not in frame.columns:
        return Vocabulary(items)
    names = lk.dataset(folder.parent / CATEGORIES_FOLDER, format="parquet").to_table().to_pandas() \
        .sort_values("category_index")
    if names["category_index"].tolist() != list(range(len(names))):
        raise ValueError(f"categories at {folder.parent / CATEGORIES_FOLDER} do not index 0..{len(names) - 1}")
    return Vocabulary(items, names["category"].tolist(), frame["category_index"].to_numpy(np.int64))
