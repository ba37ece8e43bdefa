"""The ``two_stage`` prior: a second VAE on the latents (Dai & Wipf, ICLR 2019; docs/priors.md §11).

A small Gaussian VAE is fitted, with the first VAE frozen, on standardized draws
``x = (z - shift) / sigma`` of the aggregate posterior: encoder ``q(u | x) = N(m(x), diag
exp l(x))``, prior ``p(u) = N(0, I)``, decoder ``p(x | u) = N(g(u), diag exp 2c)`` with a learned
per-dimension log scale ``c`` (Dai & Wipf's learned ``gamma``, per dimension). Its density
``p(x) = int p(x | u) p(u) du`` has no closed form:

- ``log_prob`` is the importance-weighted bound (Burda et al. 2016) with ``K = iw_samples``
  draws ``u_k = m(x) + exp(l(x) / 2) eps_k``; the ``eps_k`` ``(K, U)`` are fixed at
  construction (a buffer, common to every row and call), so ``log_prob`` is deterministic,
  batch-separable and differentiable in ``z``. It is an **estimate**: a lower bound of
  ``log p(z)`` in expectation over the ``eps_k``, with Monte Carlo error;
- hence ``normalized = False``: :meth:`TwoStagePrior.log_normalizer` returns ``log Z = 0`` with
  the Monte Carlo SE of the estimate (the delta-method SE of the IW average, averaged over the
  prior's own draws; with common ``eps_k`` the error is largely shared by all rows, like that of
  a ``log Z``), so every table row built on it (cross-entropy, IW bound, Delta, and an NCP over
  it) carries that SE;
- sampling is exact and ancestral: ``u ~ N(0, I)``, ``x ~ p(x | u)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import ConfigError, FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import seeded_init
from ncpvae.tilted import log_mean_exp
from ncpvae_plugins.neural_fit import NeuralFitConfig, StandardizedPrior, mlp

__all__ = ["SecondVAE", "TwoStagePrior"]

_LOG_2PI = math.log(2 * math.pi)
#: the decoder's log scale is kept above this (Dai & Wipf's gamma -> 0 on a manifold)
_LOG_SCALE_MIN = -7.0
#: rows x importance draws per decoder call when evaluating the bound (bounds memory)
_IW_ROWS = 1 << 18


def _log_normal(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """``log N(x; mean, exp(2 log_scale))`` summed over the last dimension."""
    u = (x - mean) * torch.exp(-log_scale)
    return (-0.5 * u**2 - log_scale - 0.5 * _LOG_2PI).sum(-1)


class SecondVAE(nn.Module):
    """The second-stage VAE over ``D``-dim inputs with a ``U``-dim code (MLPs of ``hidden``)."""

    def __init__(self, dim: int, code: int, hidden: list[int]):
        super().__init__()
        self.encoder = mlp(dim, hidden, 2 * code)
        self.decoder = mlp(code, hidden[::-1], dim)
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(n, D) -> (n, U), (n, U)``: mean and log standard deviation of ``q(u | x)``."""
        mean, log_var = self.encoder(x).chunk(2, -1)
        return mean, 0.5 * log_var

    def decoder_scale(self) -> Tensor:
        return self.log_scale.clamp_min(_LOG_SCALE_MIN)

    def log_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """``log p(x | u_k) + log p(u_k) - log q(u_k | x)`` ``(n, K)`` for ``eps`` ``(n or 1,
        K, U)``, ``u_k = m(x) + exp(l(x) / 2) eps_k``."""
        mean, log_std = self.encode(x)
        u = mean.unsqueeze(1) + torch.exp(log_std).unsqueeze(1) * eps
        log_q = _log_normal(u, mean.unsqueeze(1), log_std.unsqueeze(1))
        log_p_u = -0.5 * (u**2).sum(-1) - 0.5 * u.shape[-1] * _LOG_2PI
        log_p_x = _log_normal(x.unsqueeze(1), self.decoder(u), self.decoder_scale())
        return log_p_x + log_p_u - log_q


class TwoStagePrior(StandardizedPrior):
    """A second VAE over standardized latents: an IW-bound log density (an estimate, see the
    module docstring), exact ancestral sampling."""

    name = "two_stage"
    normalized = False
    fitted_part = "a fitted second-stage VAE"

    class Config(NeuralFitConfig):
        name: Literal["two_stage"] = "two_stage"
        code_dim: int | None = Field(None, ge=1, le=4096, description="the second VAE's code "
                                     "size U (None: the latent size D, as Dai & Wipf)")
        iw_samples: int = Field(256, ge=1, le=100_000, description="importance draws K of "
                                "the IW bound that log_prob returns")
        se_samples: int = Field(2000, ge=2, le=1_000_000, description="own draws over which "
                                "log_normalizer averages the bound's Monte Carlo SE")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *, seed: int = 0):
        super().__init__(base, config, seed=seed)
        cfg = self.config
        code = cfg.code_dim if cfg.code_dim is not None else self.latent_dim
        self.code_dim = int(code)
        self.net = seeded_init(self.seed, lambda: SecondVAE(self.latent_dim, code,
                                                            list(cfg.hidden)))
        eps = torch.randn(cfg.iw_samples, code, generator=torch.Generator().manual_seed(
            self.seed + 1), dtype=torch.get_default_dtype())
        self.register_buffer("iw_eps", eps)

    @property
    def label(self) -> str:
        return f"two-stage VAE (IW estimate, K={self.config.iw_samples})"

    # ------------------------------------------------------------------------------------------
    # density (an estimate) and sampling

    def _log_weights(self, x: Tensor) -> Tensor:
        """``(n, D) -> (n, K)`` importance log weights with the fixed draws, in chunks."""
        rows = max(1, _IW_ROWS // self.config.iw_samples)
        eps = self.iw_eps.to(x.dtype).unsqueeze(0)
        parts = [self.net.log_weights(part, eps) for part in x.split(rows)]
        return torch.cat(parts) if parts else x.new_zeros(0, self.config.iw_samples)

    def log_prob_x(self, x: Tensor) -> Tensor:
        """``(n, D) -> (n,)``: the IW bound ``log mean_k w_k`` of standardized rows."""
        return torch.logsumexp(self._log_weights(x), -1) - math.log(self.config.iw_samples)

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the IW estimate of ``log p(z)`` (a lower bound in
        expectation; subtract :meth:`log_normalizer`'s 0 and carry its SE)."""
        self.require_fitted("log_prob")
        return self.log_prob_rows(z, self.log_prob_x)

    def log_normalizer(self, num_samples: int | None = None, *,
                       generator: torch.Generator | None = None) -> tuple[float, float]:
        """``(0.0, SE)``: the density estimate's Monte Carlo SE, the delta-method SE of each
        row's IW average (:func:`ncpvae.tilted.log_mean_exp`) averaged over ``se_samples`` of the
        prior's own draws from ``generator`` (``num_samples`` is not used: the SE is a property
        of the estimator, not of a normalizer estimate)."""
        self.require_fitted("log_normalizer")
        with torch.no_grad():
            x = self.standardize(self.sample(self.config.se_samples, generator=generator))
            weights = self._log_weights(x)
        ses = [log_mean_exp(row)[1] for row in weights]
        return 0.0, float(sum(ses) / len(ses))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact ancestral draws ``(n, D)``: ``u ~ N(0, I)``, then ``x ~ p(x | u)``."""
        self.require_fitted("sample")
        if n < 0:
            raise ValueError(f"cannot draw a negative number of samples ({n})")
        u = self.standard_normal(n, self.code_dim, generator)
        noise = self.standard_normal(n, self.latent_dim, generator)
        x = self.net.decoder(u) + torch.exp(self.net.decoder_scale()) * noise
        return self.unstandardize(x)

    # ------------------------------------------------------------------------------------------
    # fitting

    def negative_elbo(self, x: Tensor, aux: Tensor | None) -> Tensor:
        """``-ELBO`` per row ``(n,)`` with one reparameterized draw (``aux`` ``(n, U)``)."""
        if aux is None:
            raise ConfigError("two_stage fit: the ELBO needs reparameterization noise")
        return -self.net.log_weights(x, aux.unsqueeze(1)).squeeze(1)

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Fit the second VAE by its ELBO on standardized draws (see
        :meth:`StandardizedPrior.fit_network`); the held-out loss uses one fixed draw per row."""
        def draw(n: int, generator: torch.Generator) -> Tensor:
            return torch.randn(n, self.code_dim, generator=generator, device=generator.device,
                               dtype=self.shift.dtype).to(self.shift.device)

        return self.fit_network(mu, logvar, options, self.negative_elbo, draw,
                                desc="fit two_stage")


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [TwoStagePrior]
