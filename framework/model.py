"""The latent-variable model (encoder + decoder) interface.

Images ``x`` are ``(B, C, H, W)`` in [0, 1]; ``encode`` returns the diagonal Gaussian posterior
``q(z|x) = N(mu, exp(logvar))`` as two ``(B, D)`` tensors; ``decode`` maps ``(..., D)`` latents
to likelihood parameters ``(..., C, H, W)`` (Bernoulli logits, or Gaussian means).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncpvae.component import Component

LIKELIHOODS = ("bernoulli", "gaussian")


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One draw ``z = mu + exp(logvar / 2) * eps`` per row of ``q(z|x) = N(mu, exp(logvar))``.

    ``mu``, ``logvar``: ``(..., D)``; returns ``(..., D)``, differentiable in both. ``eps`` comes
    from ``generator`` (global RNG when None), drawn on ``mu``'s device and dtype.
    """
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * noise


class LatentModel(nn.Module, Component, metaclass=ABCMeta):
    """An encoder/decoder pair with a pixel likelihood.

    ``likelihood`` is ``"bernoulli"`` (decoder outputs logits; for binary or [0, 1] images) or
    ``"gaussian"`` (decoder outputs means; scale ``exp(log_scale)``, fixed or learned).
    """

    kind: ClassVar[str] = "model"

    def __init__(self, latent_dim: int, likelihood: str = "bernoulli", gaussian_scale: float = 0.1,
                 learn_scale: bool = False):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got '{likelihood}'")
        self.latent_dim = int(latent_dim)
        self.likelihood = likelihood
        log_scale = torch.tensor(math.log(gaussian_scale))
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

    def recon_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``log p(x | z)`` summed over pixels: ``(B, C, H, W) x (B, C, H, W) -> (B,)``."""
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
            return -nll.flatten(1).sum(1)
        log_scale = self.log_scale
        lp = -0.5 * ((x - params) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(1)

    def mean_image(self, params: Tensor) -> Tensor:
        """The likelihood's mean as an image in [0, 1], for plots."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        return params.clamp(0.0, 1.0)
