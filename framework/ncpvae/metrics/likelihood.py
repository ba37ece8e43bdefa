"""Held-out likelihood bounds: the ELBO and the importance-weighted bound (Burda et al. 2016).

With ``z_s ~ q(z|x) = N(mu, exp(logvar))`` (the model's encoder) and the log weights

    log w_s = log p(x | z_s) + log p(z_s) - log q(z_s | x),

the bounds per example are ``ELBO = mean_s log w_s`` and ``L_K = logsumexp_s log w_s - log K``;
``ELBO <= L_K <= log p(x)`` and ``E L_K`` grows with K towards ``log p(x)`` (Burda et al., Thm 1).
Both are computed from the same draws, so ``L_K >= ELBO`` holds per example by Jensen.

Unnormalized priors (NCP: ``prior.normalized`` is False, ``log_prob = log p_base + f``) need
``log_normalizer = (log Z, se)`` (docs/math.md §3), which is subtracted from every log weight. Its
error is shared by every example (one estimate), so the reported standard error of a mean bound
is ``sqrt(se_data^2 + se_logZ^2)``; and as ``log Z``'s Monte Carlo estimate is biased low, the
bound is then an estimate, not a strict lower bound. Units: nats per example.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ncpvae.data import ImageSource
from ncpvae.errors import ConfigError, DataError, NonFiniteError
from ncpvae.metrics._common import MetricResult
from ncpvae.model import LatentModel
from ncpvae.modes import eval_mode
from ncpvae.prior import Prior

#: importance samples per example (Burda et al. evaluate with 5000; cost grows linearly in K)
IW_NUM_SAMPLES = 1000
#: latents decoded per call (bounds memory: K is processed in chunks of max_batch // B)
MAX_BATCH = 4096

LogNormalizer = tuple[float, float]


@dataclass(frozen=True)
class BoundEstimate(MetricResult):
    mean: float  # nats per example
    se: float  # total standard error: sqrt(se_data^2 + se_log_normalizer^2)
    se_data: float  # std over examples / sqrt(n)
    se_log_normalizer: float
    num_examples: int
    num_samples: int


@dataclass(frozen=True)
class LikelihoodResult(MetricResult):
    iw: BoundEstimate
    elbo: BoundEstimate


def _log_z(prior: Prior, log_normalizer: LogNormalizer | None) -> float:
    if not getattr(prior, "normalized", True):
        if log_normalizer is None:
            raise ConfigError(
                f"the '{getattr(prior, 'name', type(prior).__name__)}' prior is unnormalized; pass "
                "log_normalizer=(log_z, se) from its log Z estimate"
            )
        return float(log_normalizer[0])
    if log_normalizer is not None:
        raise ConfigError("log_normalizer was given for a normalized prior; leave it None")
    return 0.0


@torch.no_grad()
def importance_draws(
    model: LatentModel,
    x: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    max_batch: int = MAX_BATCH,
) -> tuple[Tensor, Tensor]:
    """Importance draws ``z_s ~ q(z|x)`` ``(K, B, D)`` for images ``x`` ``(B, C, H, W)`` and the
    prior-free part of their log weights, ``log p(x|z_s) - log q(z_s|x)`` ``(K, B)`` (float64).

    Every prior scored on the same draws (:func:`prior_log_weights`) sees the same ``z_s`` and
    shares this part, so the decoder runs once however many priors are compared. ``K`` is drawn
    in chunks of ``max_batch // B`` (the same ``generator`` stream whatever the prior).
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    with eval_mode(model):
        mu, logvar = model.encode(x)
        if mu.ndim != 2 or mu.shape != logvar.shape or mu.shape[0] != x.shape[0]:
            raise DataError(f"encode must return (mu, logvar) of shape (B, D), got "
                            f"{tuple(mu.shape)} and {tuple(logvar.shape)}")
        batch, dim = mu.shape
        std = (0.5 * logvar).exp()
        chunk = max(1, max_batch // batch)
        zs, partial = [], []
        for start in range(0, num_samples, chunk):
            c = min(chunk, num_samples - start)
            eps_device = generator.device if generator is not None else mu.device
            eps = torch.randn((c, batch, dim), generator=generator, dtype=mu.dtype,
                              device=eps_device).to(mu.device)
            z = mu + std * eps  # (c, B, D)
            log_q = (-0.5 * (eps**2 + logvar + math.log(2 * math.pi))).sum(-1)
            flat = z.reshape(c * batch, dim)
            params = model.decode(flat)
            x_rep = x.unsqueeze(0).expand(c, *x.shape).reshape(c * batch, *x.shape[1:])
            log_px = model.recon_log_prob(x_rep, params).reshape(c, batch)
            zs.append(z)
            partial.append(log_px.double() - log_q.double())
    return torch.cat(zs, 0), torch.cat(partial, 0)


@torch.no_grad()
def prior_log_weights(
    prior: Prior,
    z: Tensor,
    partial: Tensor,
    *,
    log_normalizer: LogNormalizer | None = None,
    max_batch: int = MAX_BATCH,
) -> Tensor:
    """Log weights ``(K, B)`` (float64) of the draws ``z`` ``(K, B, D)`` of
    :func:`importance_draws` under ``prior``: ``partial + log p(z) - log Z``."""
    log_z = _log_z(prior, log_normalizer)
    k, batch, dim = z.shape
    flat = z.reshape(k * batch, dim)
    with eval_mode(prior):
        log_pz = torch.cat([prior.log_prob(part).double() for part in flat.split(max_batch)])
    lw = partial.to(log_pz.device) + log_pz.reshape(k, batch) - log_z
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise NonFiniteError("importance log weights contain NaN or +inf; check model and prior")
    return lw


def bounds_from_log_weights(lw: Tensor) -> tuple[Tensor, Tensor]:
    """``(iw_bound, elbo)``, each ``(B,)``, from log weights ``(K, B)``."""
    return torch.logsumexp(lw, 0) - math.log(lw.shape[0]), lw.mean(0)


@dataclass
class ImportanceSample:
    """Importance draws of a set of images, made once and scored under any number of priors:
    per batch of images, the ``z`` ``(K, B, D)`` and the prior-free log weights ``(K, B)``
    (float64) of :func:`importance_draws`. Every prior sees the same draws, so the encoder and
    the decoder run once however many priors are compared, and per-image differences between
    priors are paired."""

    batches: list[tuple[Tensor, Tensor]]
    num_samples: int

    @classmethod
    def draw(cls, model: LatentModel, images: Iterable[Tensor], num_samples: int, *,
             generator: torch.Generator | None = None,
             max_batch: int = MAX_BATCH) -> ImportanceSample:
        """``num_samples`` draws per image of each batch ``(B, C, H, W)`` of ``images``, all
        from the one ``generator`` stream in batch order."""
        return cls([importance_draws(model, x, num_samples, generator=generator,
                                     max_batch=max_batch) for x in images], num_samples)

    @property
    def num_examples(self) -> int:
        return sum(z.shape[1] for z, _ in self.batches)

    def bounds(self, prior: Prior, log_normalizer: LogNormalizer | None = None, *,
               max_batch: int = MAX_BATCH) -> tuple[Tensor, Tensor]:
        """Per-image ``(iw_bound, elbo)``, each ``(N,)`` float64 on the CPU, under ``prior``
        (``log_normalizer`` as for :func:`prior_log_weights`)."""
        iw, elbo = zip(*(bounds_from_log_weights(prior_log_weights(
            prior, z, partial, log_normalizer=log_normalizer, max_batch=max_batch))
            for z, partial in self.batches))
        return torch.cat([v.cpu() for v in iw]), torch.cat([v.cpu() for v in elbo])


@torch.no_grad()
def log_weights(
    model: LatentModel,
    prior: Prior,
    x: Tensor,
    num_samples: int,
    *,
    log_normalizer: LogNormalizer | None = None,
    generator: torch.Generator | None = None,
    max_batch: int = MAX_BATCH,
) -> Tensor:
    """Importance log weights ``(K, B)`` (float64) for images ``x`` ``(B, C, H, W)``."""
    _log_z(prior, log_normalizer)  # a missing or superfluous log Z fails before any decoding
    z, partial = importance_draws(model, x, num_samples, generator=generator,
                                  max_batch=max_batch)
    return prior_log_weights(prior, z, partial, log_normalizer=log_normalizer,
                             max_batch=max_batch)


def bounds(
    model: LatentModel, prior: Prior, x: Tensor, num_samples: int = IW_NUM_SAMPLES, *,
    log_normalizer: LogNormalizer | None = None, generator: torch.Generator | None = None,
    max_batch: int = MAX_BATCH,
) -> tuple[Tensor, Tensor]:
    """``(iw_bound, elbo)``, each ``(B,)`` float64, from the same ``num_samples`` draws."""
    lw = log_weights(model, prior, x, num_samples, log_normalizer=log_normalizer,
                     generator=generator, max_batch=max_batch)
    return bounds_from_log_weights(lw)


def iw_bound(
    model: LatentModel, prior: Prior, x: Tensor, num_samples: int = IW_NUM_SAMPLES,
    log_normalizer: LogNormalizer | None = None, *, generator: torch.Generator | None = None,
    max_batch: int = MAX_BATCH,
) -> Tensor:
    """Importance-weighted bound ``L_K`` per example, ``(B,)`` float64 nats."""
    return bounds(model, prior, x, num_samples, log_normalizer=log_normalizer,
                  generator=generator, max_batch=max_batch)[0]


def elbo(
    model: LatentModel, prior: Prior, x: Tensor, num_samples: int = 1,
    log_normalizer: LogNormalizer | None = None, *, generator: torch.Generator | None = None,
    max_batch: int = MAX_BATCH,
) -> Tensor:
    """Monte Carlo ELBO per example (mean over ``num_samples`` draws), ``(B,)`` float64 nats."""
    return bounds(model, prior, x, num_samples, log_normalizer=log_normalizer,
                  generator=generator, max_batch=max_batch)[1]


def summarize_bound(values: Tensor, num_samples: int,
                    log_normalizer: LogNormalizer | None = None) -> BoundEstimate:
    """Mean of per-example bounds ``(N,)`` with its standard error, including ``log Z``'s."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise DataError("summarize_bound needs at least 2 examples for a standard error")
    se_data = float(v.std() / math.sqrt(v.numel()))
    se_z = float(log_normalizer[1]) if log_normalizer is not None else 0.0
    return BoundEstimate(mean=float(v.mean()), se=math.sqrt(se_data**2 + se_z**2),
                         se_data=se_data, se_log_normalizer=se_z, num_examples=v.numel(),
                         num_samples=num_samples)


def evaluate_likelihood(
    model: LatentModel, prior: Prior, images: Tensor | ImageSource, *,
    num_samples: int = IW_NUM_SAMPLES, log_normalizer: LogNormalizer | None = None,
    batch_size: int = 64, seed: int = 0, max_batch: int = MAX_BATCH,
) -> LikelihoodResult:
    """IW bound and ELBO (same draws) averaged over ``images`` ``(N, C, H, W)`` or a source."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    generator = torch.Generator(device=device).manual_seed(seed)
    iw_all, elbo_all = [], []
    n = len(images)
    for start in range(0, n, batch_size):
        if isinstance(images, ImageSource):
            x = images.get_batch(torch.arange(start, min(n, start + batch_size)))
        else:
            x = images[start:start + batch_size]
        iw, el = bounds(model, prior, x.to(device), num_samples, log_normalizer=log_normalizer,
                        generator=generator, max_batch=max_batch)
        iw_all.append(iw.cpu())
        elbo_all.append(el.cpu())
    return LikelihoodResult(
        iw=summarize_bound(torch.cat(iw_all), num_samples, log_normalizer),
        elbo=summarize_bound(torch.cat(elbo_all), num_samples, log_normalizer),
    )
