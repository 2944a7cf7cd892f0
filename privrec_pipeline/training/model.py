"""The recommender: item-side parameters only (privacy contract point 5).

A user is represented by nothing but their own history: the user vector is an attention-
weighted mean of input item embeddings, with one learned weight (logit) per item,

    alpha_j = softmax_{j in H}(a_j),   u = sum_{j in H} alpha_j * E_in[j],

and items are scored by ``s = E_out u + b``. Every trainable parameter belongs to an item
(``E_in``, ``a``, ``E_out``, ``b``), so publishing the model publishes no user vector; a
user's vector is computed at serving time from that user's history.

Training loss per user (multinomial likelihood of the history, as Mult-DAE: Liang et al.
2018, "Variational Autoencoders for Collaborative Filtering", WWW): with input dropout on
the history, ``L_u = -(1 / |H|) sum_{i in H} w_i log softmax(s)_i`` over the full vocabulary,
where ``w_i`` are the event-type weights normalized to mean 1 over the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int = 64
    input_dropout: float = 0.5
    init_scale: float = 0.05


class ItemModel(nn.Module):
    """Item embeddings in and out, item biases, item pooling logits (nn.Embedding / nn.Linear,
    so Opacus can wrap the same model for the benchmark)."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.item_in = nn.Embedding(config.vocab_size, config.dim)
        self.pool_logit = nn.Embedding(config.vocab_size, 1)
        self.item_out = nn.Linear(config.dim, config.vocab_size)
        with torch.no_grad():
            for weight in (self.item_in.weight, self.item_out.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * config.init_scale)
            self.pool_logit.weight.zero_()
            self.item_out.bias.zero_()

    def user_vectors(self, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B, d] and the pooling weights alpha [B, L] for padded histories ``items`` [B, L]
        whose valid positions are ``mask`` (a row with no valid position gets u = 0)."""
        logits = self.pool_logit(items).squeeze(-1).masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        alpha = torch.nan_to_num(alpha, nan=0.0)  # empty rows: all -inf
        u = torch.einsum("bl,bld->bd", alpha, self.item_in(items))
        return u, alpha

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores [B, V] of every item for each padded history."""
        u, _ = self.user_vectors(items, mask)
        return self.item_out(u)


def dropout_mask(mask: torch.Tensor, keep: float, generator: torch.Generator | None) -> torch.Tensor:
    """Input dropout on histories, keeping at least one item per non-empty row."""
    if keep >= 1.0:
        return mask
    kept = mask & (torch.rand(mask.shape, generator=generator) < keep)
    empty = ~kept.any(dim=1) & mask.any(dim=1)
    return torch.where(empty.unsqueeze(1), mask, kept)


def target_matrix(items: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """y [B, V]: each history item's weight, normalized so a row sums to 1 (0 for empty rows)."""
    w = weights * mask
    total = w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.zeros(items.shape[0], vocab, dtype=torch.float32)
    y.scatter_add_(1, items, (w / total).float())
    return y
