"""The latent prior interface.

Shapes: ``z`` is ``(..., D)``; ``log_prob`` and ``energy`` return ``(...)``. The energy is
``U(z) = -log p(z)`` up to an additive constant and is batch-separable (row i depends on
``z[i]`` only), so ``autograd.grad(U(z).sum(), z)`` gives each chain its own gradient.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ncpvae.component import Component
from ncpvae.errors import DataError


class Prior(nn.Module, Component):
    """A density over latents ``z`` in R^D.

    Capability flags (class attributes): ``normalized`` (``log_prob`` includes the normalizer),
    ``requires_fit`` (learned after the VAE is trained, with the VAE frozen), ``exact_sampling``
    (``sample`` draws exactly from the prior rather than approximately).
    """

    kind: ClassVar[str] = "prior"
    normalized: ClassVar[bool] = True
    requires_fit: ClassVar[bool] = False
    exact_sampling: ClassVar[bool] = True
    #: how ``sample`` draws, for figure titles and reports (e.g. "SIR" for the NCP prior)
    sampling_method: ClassVar[str] = "exact"

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = int(latent_dim)

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: log density (unnormalized when ``normalized`` is False)."""

    @abstractmethod
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` latents, ``(n, D)``, on the prior's device and dtype."""

    def energy(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: ``-log p(z)`` up to a constant (the sampler's target)."""
        return -self.log_prob(z)

    def kl_from_gaussian(self, mu: Tensor, logvar: Tensor) -> Tensor | None:
        """Per-dimension ``KL(N(mu, exp(logvar)) || p)``, ``(B, D)``, or None without a closed form."""
        return None

    def fit(
        self,
        mu: Tensor,
        logvar: Tensor,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Fit a learned prior (``requires_fit``) to the aggregate posterior of a frozen VAE.

        ``mu`` and ``logvar`` are the encoder outputs ``(N, D)`` for the whole training set;
        fresh reparameterized draws ``z ~ q(z|x)`` are made from them as needed. ``log`` receives
        one plain-data record per epoch; the return value is a plain-data summary.
        """
        raise NotImplementedError(f"the {self.name} prior has nothing to fit")

    @property
    def base_prior(self) -> Prior:
        """The tractable prior this one builds on: itself here. The VAE trains against it and
        samplers start from it; a learned prior such as NCP returns its base."""
        return self

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        return {
            "normalized": cls.normalized,
            "requires_fit": cls.requires_fit,
            "exact_sampling": cls.exact_sampling,
        }

    def check_latents(self, z: Tensor, what: str = "latents") -> None:
        """Raise a clear error unless ``z`` is ``(..., D)`` and finite."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(
                f"{what}: expected shape (..., {self.latent_dim}) for a {self.latent_dim}-dim "
                f"{self.name} prior, got {tuple(z.shape)}"
            )
        if not torch.isfinite(z).all():
            raise DataError(f"{what}: contain NaN or infinite values")

    def _param_like(self) -> Tensor:
        """A floating tensor carrying the module's device and dtype (parameters or buffers)."""
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t
        return torch.empty(0)
