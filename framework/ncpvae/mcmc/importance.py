"""Sampling-importance-resampling (SIR), the one implementation behind the ``sir`` sampler's
:meth:`sample_prior` and the NCP prior's :meth:`sample_with_info`.

- :func:`ess_fraction`: the Kish effective sample size of importance weights, over their number;
- :func:`importance_resample`: multinomial resampling of candidates by their weights (any number
  of candidates: above torch's limit of 2^24 categories the draw is split in two stages);
- :func:`sampling_importance_resampling`: propose, weight (in chunks) and resample (in pools).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ncpvae.errors import NonFiniteError

#: The most categories one ``torch.multinomial`` call accepts (a torch limit).
MULTINOMIAL_MAX_CATEGORIES = 1 << 24


def ess_fraction(log_weights: Tensor) -> float:
    """Kish effective sample size over the number of weights: ``(sum w)^2 / (M sum w^2)`` in (0, 1]."""
    lw = log_weights.detach().to(torch.float64)
    log_ess = 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)
    return float(log_ess.exp() / lw.numel())


def _multinomial(probs: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """``num_samples`` i.i.d. indices ``(num_samples,)`` into ``probs`` ``(M,)`` (sum 1).

    Up to :data:`MULTINOMIAL_MAX_CATEGORIES` categories: one ``torch.multinomial`` call. Above
    it, two stages with the same law: each draw first picks a block of at most that many
    categories with probability the block's mass, then a category within the block with its
    probability renormalized in the block (P(i) = P(block) P(i | block)).
    """
    limit = MULTINOMIAL_MAX_CATEGORIES
    if probs.numel() <= limit:
        return torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    blocks = probs.split(limit)
    masses = torch.stack([b.sum() for b in blocks])
    which = torch.multinomial(masses, num_samples, replacement=True, generator=generator)
    index = torch.empty(num_samples, dtype=torch.long, device=probs.device)
    counts = torch.bincount(which, minlength=len(blocks)).tolist()
    for b, count in enumerate(counts):
        if count:
            local = torch.multinomial(blocks[b], count, replacement=True, generator=generator)
            index[which == b] = local + b * limit
    return index


def importance_resample(
    candidates: Tensor,
    log_weights: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Resample ``num_samples`` rows of ``candidates`` ``(M, D)`` with probability ∝ ``exp(log_weights)``.

    Multinomial resampling with replacement (any M, see :func:`_multinomial`). Returns the
    ``(num_samples, D)`` draws and the ESS fraction of the weights (1 means the proposal already
    matches the target).
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
    index = _multinomial(probs.to(device), num_samples, generator)
    return candidates[index.to(candidates.device)], ess_fraction(lw)


class SIRDraws(NamedTuple):
    """The output of :func:`sampling_importance_resampling`: ``samples`` ``(n, D)`` and the
    ``log_weights`` ``(M,)`` of all ``M = n * num_candidates`` candidates (pools concatenated)."""

    samples: Tensor
    log_weights: Tensor


def sampling_importance_resampling(
    propose: Callable[[int], Tensor],
    log_weight: Callable[[Tensor], Tensor],
    num_samples: int,
    num_candidates: int,
    *,
    pool_size: int | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SIRDraws:
    """SIR: ``num_samples`` approximate draws from ``q(z) w(z)`` (normalized).

    ``propose(m) -> (m, D)`` draws ``m`` candidates from the proposal q (bind the generator
    yourself); ``log_weight(z) -> (m,)`` gives their log weights (e.g. ``-U(z) - log q(z)``;
    NaN/+inf are errors, ``-inf`` a zero weight), evaluated without a graph in chunks of
    ``chunk_size`` rows (all at once when None). Candidates are drawn and resampled in pools:
    each pool of ``k * num_candidates`` candidates gives ``k`` draws, with ``k = pool_size //
    num_candidates`` (at least 1); ``pool_size = None`` is one pool for everything (the exact SIR
    of all ``M`` candidates; pools bound memory but make draws of different pools independent
    and those of one pool slightly dependent). ``generator`` drives the resampling; ``progress``
    shows a bar over the weighting chunks.
    """
    per_pool = num_samples if pool_size is None else max(1, pool_size // num_candidates)
    draws, log_weights = [], []
    with torch.no_grad():
        for start in range(0, num_samples, per_pool):
            k = min(per_pool, num_samples - start)
            candidates = propose(k * num_candidates).detach()
            if chunk_size is None:
                lw = log_weight(candidates)
            else:
                chunks = range(0, len(candidates), chunk_size)
                if progress:
                    from tqdm.auto import tqdm

                    chunks = tqdm(chunks, desc="sir weighting", unit="chunk")
                lw = torch.cat([log_weight(candidates[lo: lo + chunk_size]) for lo in chunks])
            chosen, _ = importance_resample(candidates, lw, k, generator=generator)
            draws.append(chosen)
            log_weights.append(lw)
    return SIRDraws(torch.cat(draws), torch.cat(log_weights))
