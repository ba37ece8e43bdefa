"""Sampling-importance-resampling (SIR), shared by the ``sir`` sampler and the NCP prior."""

from __future__ import annotations

import torch
from torch import Tensor

from ncpvae.errors import NonFiniteError


def ess_fraction(log_weights: Tensor) -> float:
    """Kish effective sample size over the number of weights: ``(sum w)^2 / (M sum w^2)`` in (0, 1]."""
    lw = log_weights.detach().to(torch.float64)
    log_ess = 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)
    return float(log_ess.exp() / lw.numel())


def importance_resample(
    candidates: Tensor,
    log_weights: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Resample ``num_samples`` rows of ``candidates`` ``(M, D)`` with probability ∝ ``exp(log_weights)``.

    Multinomial resampling with replacement. Returns the ``(num_samples, D)`` draws and the
    ESS fraction of the weights (1 means the proposal already matches the target).
    """
    if candidates.ndim != 2 or log_weights.shape != candidates.shape[:1]:
        raise ValueError(
            f"expected candidates (M, D) and log_weights (M,), got {tuple(candidates.shape)} "
            f"and {tuple(log_weights.shape)}"
        )
    lw = log_weights.detach().to(torch.float64)
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise NonFiniteError("importance weights contain NaN or +inf; check the target's energy")
    if torch.isneginf(lw).all():
        raise NonFiniteError("every importance weight is zero; the proposal misses the target")
    probs = torch.softmax(lw, 0)
    # draw where the generator lives (a CUDA generator cannot drive a CPU multinomial)
    device = generator.device if generator is not None else probs.device
    index = torch.multinomial(probs.to(device), num_samples, replacement=True, generator=generator)
    return candidates[index.to(candidates.device)], ess_fraction(lw)
