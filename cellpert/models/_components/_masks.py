"""Straight-through relaxed-Bernoulli masks with exact Bernoulli log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bernoulli_log_prob", "sample_straight_through_bernoulli"]

_EPS = 1e-6


def sample_straight_through_bernoulli(
    logits: torch.Tensor,
    sample_shape: torch.Size | tuple[int, ...] = (),
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hard Bernoulli(σ(logits)) samples with relaxed (Concrete) gradients.

    With logistic noise ``n`` the relaxed sample is ``s = σ((logits + n) / τ)`` and the
    hard sample ``h = 1[logits + n > 0]``, which is exactly Bernoulli(σ(logits)) for any
    temperature τ. The returned tensor equals ``h`` in the forward pass and carries the
    gradient of ``s`` (``h + s - stop_grad(s)``).

    Parameters
    ----------
    logits
        Bernoulli logits, any shape.
    sample_shape
        Leading sample dimensions.
    temperature
        Relaxation temperature τ (paper: 1).

    Returns
    -------
    Tensor of shape ``sample_shape + logits.shape`` with values in {0, 1}.
    """
    shape = torch.Size(sample_shape) + logits.shape
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp_(_EPS, 1 - _EPS)
    noisy = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(noisy / temperature)
    hard = (noisy > 0).to(logits.dtype)
    return hard + (soft - soft.detach())


def bernoulli_log_prob(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact Bernoulli log-probability ``m log σ(l) + (1 - m) log σ(-l)`` (elementwise).

    Differentiable in both the logits and the value (so a straight-through sample
    passes its relaxed gradient through the log-probability).
    """
    return value * F.logsigmoid(logits) + (1.0 - value) * F.logsigmoid(-logits)
