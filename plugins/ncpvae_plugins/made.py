"""The ``made`` prior: an autoregressive density over the latents (docs/priors.md §12).

MADE (Germain et al., ICML 2015): one masked MLP gives, for every dimension ``j`` of the
standardized latent ``x = (z - shift) / sigma``, the parameters of a mixture of ``K`` Gaussians
that depends on ``x_{<j}`` only (natural order), so

    log p(z) = sum_j log sum_k pi_jk(x_<j) N(x_j; m_jk(x_<j), s_jk(x_<j)^2) - sum_j log sigma_j

is an exact, normalized density (one network pass), and sampling is exact and ancestral
(``D`` passes: dimension ``j`` is drawn once ``x_{<j}`` is known). Fitted by maximum likelihood
on fresh draws ``z ~ q(z|x)`` with early stopping on held-out draws.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ncpvae import FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import seeded_init
from ncpvae_plugins.neural_fit import NeuralFitConfig, StandardizedPrior

__all__ = ["MADE", "MADEPrior"]

_LOG_2PI = math.log(2 * math.pi)
#: bounds of the conditionals' log standard deviations (keeps a fit on near-constant data finite)
_LOG_SCALE_MIN, _LOG_SCALE_MAX = -7.0, 5.0


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` ``(out, in)``."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked MLP ``(n, D) -> (n, D, 3K)``: per dimension ``j`` the mixture logits, means and
    log standard deviations of ``x_j`` given ``x_{<j}`` (input degrees ``1..D``; hidden unit
    ``h`` of a layer has degree ``h mod D`` and sees inputs of degree at most its own; output
    ``j`` sees hidden units of degree below ``j``)."""

    def __init__(self, dim: int, hidden: list[int], components: int):
        super().__init__()
        self.dim, self.components = dim, components
        degrees_in = torch.arange(1, dim + 1)
        layers: list[nn.Module] = []
        previous = degrees_in
        for size in hidden:
            degrees = torch.arange(size) % dim
            layers += [MaskedLinear((degrees[:, None] >= previous[None, :]).float()), nn.SiLU()]
            previous = degrees
        out_degrees = degrees_in.repeat_interleave(3 * components)
        layers.append(MaskedLinear((out_degrees[:, None] > previous[None, :]).float()))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).reshape(len(x), self.dim, 3 * self.components)

    def conditionals(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixture log-weights, means and log standard deviations, each ``(n, D, K)``."""
        logits, means, log_scales = self(x).chunk(3, dim=-1)
        return (torch.log_softmax(logits, -1), means,
                log_scales.clamp(_LOG_SCALE_MIN, _LOG_SCALE_MAX))

    def log_prob(self, x: Tensor) -> Tensor:
        """``(n, D) -> (n,)``: the exact log density of standardized rows."""
        log_w, means, log_scales = self.conditionals(x)
        u = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
        comp = -0.5 * u**2 - log_scales - 0.5 * _LOG_2PI
        return torch.logsumexp(log_w + comp, -1).sum(-1)


class MADEPrior(StandardizedPrior):
    """A MADE density over standardized latents; normalized, exact ancestral sampling."""

    name = "made"
    fitted_part = "a fitted MADE"

    class Config(NeuralFitConfig):
        name: Literal["made"] = "made"
        components: int = Field(3, ge=1, le=64, description="Gaussians per conditional "
                                "(1: Gaussian conditionals)")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *, seed: int = 0):
        super().__init__(base, config, seed=seed)
        cfg = self.config
        self.net = seeded_init(self.seed, lambda: MADE(self.latent_dim, list(cfg.hidden),
                                                       cfg.components))

    @property
    def label(self) -> str:
        return f"MADE (K={self.config.components})"

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the exact log density."""
        self.require_fitted("log_prob")
        return self.log_prob_rows(z, self.net.log_prob)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact ancestral draws ``(n, D)``: per dimension a component, then its
        Gaussian, all noise from ``generator`` (``D`` network passes)."""
        self.require_fitted("sample")
        if n < 0:
            raise ValueError(f"cannot draw a negative number of samples ({n})")
        dim = self.latent_dim
        noise = self.standard_normal(n, dim, generator)
        device = generator.device if generator is not None else self.shift.device
        uniform = torch.rand(n, dim, generator=generator, device=device,
                             dtype=self.shift.dtype).to(self.shift.device)
        x = torch.zeros(n, dim, dtype=self.shift.dtype, device=self.shift.device)
        for j in range(dim):
            log_w, means, log_scales = (t[:, j] for t in self.net.conditionals(x))
            # inverse-CDF draw of the component from one uniform per row
            cdf = torch.cumsum(log_w.exp(), -1)
            k = torch.searchsorted(cdf, uniform[:, j:j + 1] * cdf[:, -1:]).clamp_max(
                self.config.components - 1)
            m, s = means.gather(1, k).squeeze(1), log_scales.gather(1, k).squeeze(1).exp()
            x[:, j] = m + s * noise[:, j]
        return self.unstandardize(x)

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Maximum likelihood (mean negative log density of standardized draws, nats per
        latent vector; see :meth:`StandardizedPrior.fit_network`)."""
        return self.fit_network(mu, logvar, options, lambda x, _: -self.net.log_prob(x),
                                desc="fit made")


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [MADEPrior]
