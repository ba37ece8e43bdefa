"""The latent-variable model (encoder + decoder) interface and its pixel likelihoods.

Images ``x`` are ``(B, C, H, W)`` in [0, 1]; ``encode`` returns the diagonal Gaussian posterior
``q(z|x) = N(mu, exp(logvar))`` as two ``(B, D)`` tensors; ``decode`` maps ``(..., D)`` latents
to likelihood parameters ``(..., C, H, W)`` (Bernoulli logits, or Gaussian / logistic means).

Likelihoods (``LatentModel.likelihood``):

``bernoulli``
    logits; for binary or [0, 1] grey images (not a normalized likelihood of 8-bit data).
``gaussian``
    means; scale ``exp(log_scale)``, fixed or learned, one scalar or one per pixel. A density
    on [0, 1]: its bound converts to bits/dim with ``+ 8`` (docs/math.md §1).
``discretized_logistic``
    for 8-bit images stored as ``k / 255``: each value gets the mass of the logistic
    ``Logistic(m, s)`` on its bin ``[x - 1/510, x + 1/510]``, with the two edge bins extended to
    minus / plus infinity (Salimans et al. 2017, PixelCNN++, on [0, 1] instead of [-1, 1]), so
    the 256 probabilities of each pixel sum to 1. The decoder gives ``m``; ``s = exp(log_scale)``
    is learned (one scalar or one per pixel) when ``learn_scale`` is set.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncpvae.component import Component
from ncpvae.sharding import randn_rows
from ncpvae.units import bits_per_dim

LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
#: the number of values of each dimension of 8-bit data
NUM_BINS = 256
#: half the width of one bin of 8-bit data scaled to [0, 1]
BIN_HALF_WIDTH = 0.5 / (NUM_BINS - 1)
#: learned scales are kept above this (a constant pixel would otherwise drive a density to +inf)
MIN_LOG_SCALE = math.log(1e-3)


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One draw ``z = mu + exp(logvar / 2) * eps`` per row of ``q(z|x) = N(mu, exp(logvar))``.

    ``mu``, ``logvar``: ``(..., D)``; returns ``(..., D)``, differentiable in both. ``eps`` comes
    from ``generator`` (global RNG when None), drawn on ``mu``'s device and dtype; the batch is
    dimension -2. Inside :func:`ncpvae.sharding.row_shard` (a rank of a distributed run holding
    some rows of the global batch) ``eps`` is those rows of the single-process draw.
    """
    noise = randn_rows(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * noise


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise ``log P(x)`` of 8-bit values ``x = k / 255`` under a discretized logistic.

    ``P(k) = sigma((x + h - m) / s) - sigma((x - h - m) / s)`` with ``h = 1/510``, the first bin
    extended to ``-inf`` and the last to ``+inf``. Computed stably as
    ``log sigma(a) + log sigma(-b) + log(1 - exp(b - a))`` for ``a = (x + h - m) / s``,
    ``b = (x - h - m) / s`` (an identity of the logistic function). Shapes broadcast; returns
    the broadcast shape.
    """
    inv_scale = torch.exp(-log_scale)
    centred = x - mean
    a = (centred + BIN_HALF_WIDTH) * inv_scale
    b = (centred - BIN_HALF_WIDTH) * inv_scale
    first = x < BIN_HALF_WIDTH  # k = 0: the bin reaches down to -inf
    last = x > 1.0 - BIN_HALF_WIDTH  # k = 255: the bin reaches up to +inf
    upper = torch.where(last, torch.zeros_like(a), F.logsigmoid(a))
    lower = torch.where(first, torch.zeros_like(b), F.logsigmoid(-b))
    width = torch.where(first | last, torch.zeros_like(a),
                        torch.log(-torch.expm1(-(a - b).clamp(min=1e-12))))
    return upper + lower + width


class LatentModel(nn.Module, Component, metaclass=ABCMeta):
    """An encoder/decoder pair with a pixel likelihood (see the module docstring).

    ``scale_shape`` is the shape of the (fixed or learned) log-scale of the ``gaussian`` and
    ``discretized_logistic`` likelihoods: ``()`` for one scalar, ``(C, H, W)`` for one per pixel.
    """

    kind: ClassVar[str] = "model"

    def __init__(self, latent_dim: int, likelihood: str = "bernoulli", gaussian_scale: float = 0.1,
                 learn_scale: bool = False, scale_shape: tuple[int, ...] = ()):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got '{likelihood}'")
        self.latent_dim = int(latent_dim)
        self.likelihood = likelihood
        log_scale = torch.full(tuple(scale_shape), math.log(gaussian_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @abstractmethod
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (mu, logvar)``, each ``(B, D)``."""

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """``(B, D) -> (B, C, H, W)`` likelihood parameters."""

    # -- what the likelihood is, for the reporting side ----------------------------------------

    @property
    def discrete_bins(self) -> int | None:
        """256 when ``recon_log_prob`` is a probability over the 256 values of 8-bit data
        (its bound is directly in bits/dim), else None."""
        return NUM_BINS if self.likelihood == "discretized_logistic" else None

    @property
    def continuous_on_unit_interval(self) -> bool:
        """True when ``recon_log_prob`` is a density on [0, 1] data (bits/dim add 8)."""
        return self.likelihood == "gaussian"

    def bits_per_dim(self, nats: float, num_dims: int) -> float | None:
        """``nats`` per image (``-ELBO`` or ``-log p``) in bits/dim for this likelihood, or None
        when it is not a likelihood of 8-bit data (Bernoulli on grey images)."""
        if self.discrete_bins is not None:
            return bits_per_dim(nats, num_dims)
        if self.continuous_on_unit_interval:
            return bits_per_dim(nats, num_dims, continuous_on_unit_interval=True)
        return None

    # -- the likelihood ------------------------------------------------------------------------

    def recon_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``log p(x | z)`` summed over pixels: ``(B, C, H, W) x (B, C, H, W) -> (B,)``."""
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
            return -nll.flatten(1).sum(1)
        if self.likelihood == "discretized_logistic":
            log_scale = self.log_scale.clamp(min=MIN_LOG_SCALE)
            return discretized_logistic_log_prob(x, params, log_scale).flatten(1).sum(1)
        log_scale = self.log_scale
        if log_scale.requires_grad:
            log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
        lp = -0.5 * ((x - params) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(1)

    def mean_image(self, params: Tensor) -> Tensor:
        """The likelihood's mean as an image in [0, 1], ``(..., C, H, W)``, for plots (colour
        when C = 3)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        return params.clamp(0.0, 1.0)
