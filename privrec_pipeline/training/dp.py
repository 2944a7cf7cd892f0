"""User-level DP-SGD for ``ItemModel``: per-user clipping without per-user gradients.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS) with the user as
the unit (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
ICLR): each step Poisson-samples users with rate q, clips each sampled user's whole gradient
to L2 norm C, sums, adds N(0, (sigma C)^2) to every coordinate of every trainable
parameter, and divides by the expected batch size q N (a fixed denominator, so the
sensitivity of the average stays C / (q N)). The noise comes from ``SecureRandom`` (a
ChaCha20 CSPRNG keyed by the partition's secret, see ``secure_random``); only input dropout,
which the DP analysis does not rely on, uses a torch generator.

Per-user norms in closed form ("ghost clipping", Goodfellow 2015; Li et al. 2022, "Large
Language Models Can Be Strong Differentially Private Learners", ICLR). With r = dL/ds (the
softmax residual, [B, V]), u the user vector, alpha the pooling weights over the user's
distinct items j (``Histories`` rows hold distinct items; padding has alpha = 0), e_j the
input representation of item j and g = dL/du = sum_i r_i (E_out[i] + C_out[c(i)]):

    ||dL/db||^2     = ||r||^2
    ||dL/dE_out||^2 = ||r||^2 ||u||^2                 (dL/dE_out = r u^T is rank one)
    ||dL/dE_in||^2  = ||g||^2 sum_j alpha_j^2          (row j is alpha_j g)
    ||dL/da||^2     = sum_j alpha_j^2 ((e_j - u) . g)^2

With categories (``ItemModel`` with K > 0: e_j = E_in[j] + C_in[c(j)], s_i = (E_out[i] +
C_out[c(i)]) . u + b_i + cb[c(i)]), let R = r summed by category ([B, K], R_k = sum_{c(i)=k}
r_i); the category parameters are separate tensors, so their squared norms add:

    ||dL/dcb||^2    = ||R||^2                         (dL/dcb_k = R_k)
    ||dL/dC_out||^2 = ||R||^2 ||u||^2                 (dL/dC_out = R u^T is rank one)
    ||dL/dC_in||^2  = ||g||^2 sum_k (sum_{j in H, c(j)=k} alpha_j)^2   (row k is (sum alpha_j) g)

so the norms cost one extra [B, V] x [V, d] product (with categories also a [B, V] -> [B, K]
sum), never a [B, V, d] tensor. The category map is public (the catalog), and the category
parameters are clipped with the rest and get noise like every parameter (``add_noise``). The clipped
sum is then the gradient of sum_u min(1, C / ||grad_u||) L_u: one ordinary backward pass.
The embedding gradients stay sparse in what they touch (rows of the users' items).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privrec_pipeline.training.model import ItemModel, dropout_mask, target_matrix
from privrec_pipeline.training.secure_random import SecureRandom

NORM_MARGIN = 1e-5  # relative, over the closed-form norms' float32 rounding


@dataclass(frozen=True)
class Batch:
    items: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L]
    weights: torch.Tensor  # [B, L]


def user_losses(model: ItemModel, batch: Batch, generator: torch.Generator | None,
                keep: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-user losses [B] (with input dropout) and what the norm computation needs."""
    keep = 1.0 - model.config.input_dropout if keep is None else keep
    inputs = dropout_mask(batch.mask, keep, generator)
    u, alpha = model.user_vectors(batch.items, inputs)
    log_p = torch.log_softmax(model.scores(u), dim=-1)
    y = target_matrix(batch.items, batch.mask, batch.weights, model.config.vocab_size)
    losses = -(y * log_p).sum(dim=1)
    return losses, {"u": u, "alpha": alpha, "log_p": log_p, "y": y}


@torch.no_grad()
def per_user_grad_norms(model: ItemModel, batch: Batch, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each user's gradient over all trainable parameters (closed form, see the
    module docstring; ghost clipping, Li et al. 2022)."""
    u, alpha, y = cache["u"].detach(), cache["alpha"].detach(), cache["y"]
    r = cache["log_p"].detach().exp() * y.sum(dim=1, keepdim=True) - y  # dL/ds of -sum y log softmax(s)
    g = r @ model.output_layer()[0]  # [B, d]: E_out^T r (+ C_out^T R with categories)
    categories = model.item_category
    if categories is not None:
        # R [B, K]: the residual summed over each category's items.
        R = torch.zeros(r.shape[0], model.config.categories, dtype=r.dtype).index_add_(1, categories, r)
    r2, u2, g2 = (r * r).sum(1), (u * u).sum(1), (g * g).sum(1)
    e_dot_g = torch.einsum("bld,bd->bl", model.input_embeddings(batch.items), g)
    u_dot_g = (u * g).sum(1, keepdim=True)
    a2 = alpha * alpha
    norm2 = r2 * (1.0 + u2) + g2 * a2.sum(1) + (a2 * (e_dot_g - u_dot_g) ** 2).sum(1)
    if categories is not None:
        # Pooling weight per category of the history (padding has alpha = 0, so it adds nothing).
        alpha_k = torch.zeros_like(R).scatter_add_(1, categories[batch.items], alpha)
        norm2 = norm2 + (R * R).sum(1) * (1.0 + u2) + g2 * (alpha_k * alpha_k).sum(1)
    return norm2.clamp_min(0.0).sqrt()


def add_noise(model: ItemModel, noise: SecureRandom, noise_std: float, denominator: float) -> None:
    """Set every ``p.grad`` to (p.grad + N(0, noise_std^2)) / denominator (a missing gradient
    counts as 0): one keystream call for all coordinates, added in float64, rounded once."""
    params = list(model.parameters())
    draws = torch.from_numpy(noise.standard_normal(sum(p.numel() for p in params)))
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            grad = p.grad.double() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
            value = ((grad + draws[offset:offset + n].reshape(p.shape) * noise_std) / denominator).to(p.dtype)
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)
            offset += n


def dp_gradient(model: ItemModel, batch: Batch, *, clip_norm: float, noise_std: float, denominator: float,
                generator: torch.Generator | None, noise: SecureRandom | None) -> dict[str, float]:
    """Set ``p.grad`` to (sum of clipped per-user gradients + N(0, noise_std^2)) / denominator.

    ``noise_std`` is sigma x C for the full noise, or the partition's share in distributed
    mode; the noise is drawn from ``noise`` (required when ``noise_std`` > 0), ``generator``
    drives input dropout only. Returns diagnostics (mean loss, share of users clipped)."""
    if noise_std > 0 and noise is None:
        raise ValueError(f"dp_gradient: noise_std {noise_std} needs a SecureRandom noise source")
    losses, cache = user_losses(model, batch, generator)
    # The closed form agrees with autograd's norms to float32 rounding (about 1e-7 relative,
    # either way): a relative margin keeps every clipped gradient's norm <= C.
    norms = per_user_grad_norms(model, batch, cache) * (1.0 + NORM_MARGIN)
    factors = torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)  # min(1, C / ||g_u||)
    model.zero_grad(set_to_none=False)
    (losses * factors).sum().backward()
    if noise_std > 0:
        add_noise(model, noise, noise_std, denominator)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.grad.div_(denominator)
    return {"loss": float(losses.detach().mean()), "clipped": float((norms > clip_norm).float().mean()) if len(norms) else 0.0}


def plain_gradient(model: ItemModel, batch: Batch, generator: torch.Generator | None) -> dict[str, float]:
    """Non-private gradient of the mean loss (the baseline of the same model)."""
    losses, _ = user_losses(model, batch, generator)
    model.zero_grad(set_to_none=False)
    loss = losses.mean()
    loss.backward()
    return {"loss": float(loss.detach()), "clipped": 0.0}


def _event(noise_multiplier: float, sampling_rate: float, steps: int):
    from dp_accounting import dp_event

    step = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        step = dp_event.PoissonSampledDpEvent(sampling_rate, step)
    return dp_event.SelfComposedDpEvent(step, steps)


def epsilon_for(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (RDP accountant:
    Mironov 2017; Mironov, Talwar & Zhang 2019 for the sampled Gaussian, in dp_accounting)."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(_event(noise_multiplier, sampling_rate, steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """The smallest noise multiplier sigma whose guarantee is within (epsilon, delta)."""
    from dp_accounting import mechanism_calibration
    from dp_accounting.rdp import RdpAccountant

    if not (epsilon > 0 and 0 < delta < 1 and 0 < sampling_rate <= 1 and steps >= 1):
        raise ValueError(f"cannot calibrate noise for epsilon {epsilon}, delta {delta}, "
                         f"sampling rate {sampling_rate}, {steps} steps")
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        RdpAccountant, lambda s: _event(s, sampling_rate, steps), epsilon, delta,
        mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    return float(sigma)


def noise_std_share(noise_multiplier: float, clip_norm: float, parties: int, tolerance: int) -> float:
    """Distributed DP with an honest-party threshold: each of ``parties`` adds
    N(0, sigma^2 C^2 / (parties - tolerance)), so any ``parties - tolerance`` honest shares
    together have variance >= sigma^2 C^2 (a sum of independent Gaussians) and the sum keeps
    the guarantee of sigma even if ``tolerance`` parties collude with the aggregator (they can
    subtract their own shares) or leave their noise out (Truex et al. 2019, "A Hybrid Approach
    to Privacy-Preserving Federated Learning", AISec; Kairouz, Liu & Steinke 2021, "The
    Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
    ICML). ``tolerance = parties - 1``: every share alone carries the full noise."""
    if not 0 <= tolerance <= parties - 1:
        raise ValueError(f"collusion tolerance {tolerance} must be in 0..{parties - 1} for {parties} parties")
    return noise_multiplier * clip_norm / math.sqrt(parties - tolerance)
