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
