"""The ``gaussian`` prior: a diagonal Gaussian, N(0, I) by default.

Mean and log-scale are optionally learnable (one value per latent dimension), trained with the
VAE. The KL from a diagonal Gaussian posterior has a closed form, used by the beta-ELBO.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import BuildContext, ComponentConfig, Prior, hookimpl

_LOG_2PI = math.log(2 * math.pi)


class GaussianPrior(Prior):
    """``p(z) = N(z; mean, diag(scale^2))``; ``mean`` and ``scale`` are ``(D,)``.

    Built from ``latent_dim`` and a :class:`GaussianPrior.Config` (N(0, I) when None, also for
    a subclass with a ``Config`` of its own), in ``dtype`` (default: torch's default dtype).
    """

    name = "gaussian"

    class Config(ComponentConfig):
        name: Literal["gaussian"] = "gaussian"
        mean: float = Field(0.0, description="initial mean of every dimension")
        scale: float = Field(1.0, gt=0, description="initial standard deviation of every dimension")
        learn_mean: bool = Field(False, description="train the mean with the VAE")
        learn_scale: bool = Field(False, description="train the log-scale with the VAE")

    config: Config

    def __init__(self, latent_dim: int, config: Config | None = None, *,
                 dtype: torch.dtype | None = None):
        super().__init__(latent_dim, GaussianPrior.checked_config(config))
        cfg = self.config
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        # computed in float64, then cast once: a float64 prior holds exact log(scale)
        loc = torch.full((latent_dim,), cfg.mean, dtype=torch.float64).to(dtype)
        log_scale = torch.full((latent_dim,), math.log(cfg.scale), dtype=torch.float64).to(dtype)
        if cfg.learn_mean:
            self.loc = nn.Parameter(loc)
        else:
            self.register_buffer("loc", loc)
        if cfg.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> GaussianPrior:
        return cls(ctx.require_latent_dim("the gaussian prior"), config, dtype=ctx.dtype)

    @property
    def label(self) -> str:
        """``N(0, I)`` for the standard normal (the usual VAE prior), else ``gaussian``."""
        standard = bool((self.loc == 0).all()) and bool((self.log_scale == 0).all())
        return "N(0, I)" if standard and not self.learned else self.name

    @property
    def learned(self) -> bool:
        return isinstance(self.loc, nn.Parameter) or isinstance(self.log_scale, nn.Parameter)

    def log_prob(self, z: Tensor) -> Tensor:
        standardized = (z - self.loc) * torch.exp(-self.log_scale)
        return (-0.5 * standardized**2 - self.log_scale - 0.5 * _LOG_2PI).sum(-1)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else self.loc.device
        noise = torch.randn(n, self.latent_dim, generator=generator, device=device,
                            dtype=self.loc.dtype).to(self.loc.device)
        return self.loc + noise * torch.exp(self.log_scale)

    def kl_from_gaussian(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """Per-dimension ``KL(N(mu, e^logvar) || N(loc, e^(2 log_scale)))``, ``(B, D)``."""
        var_ratio = torch.exp(logvar - 2 * self.log_scale)
        mean_term = ((mu - self.loc) * torch.exp(-self.log_scale)) ** 2
        return 0.5 * (var_ratio + mean_term - 1.0 - torch.log(var_ratio))


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [GaussianPrior]
