"""The ``gmm`` prior: a Gaussian mixture fitted ex post to the aggregate posterior (docs/priors.md §6).

``log p(z) = logsumexp_k [log pi_k + log N(z; m_k, S_k)]`` with ``K`` components and full or
diagonal covariances, fitted by EM (scikit-learn's ``GaussianMixture``) on draws
``z ~ q(z|x)`` of the whole training set (Ghosh et al. 2020 fit such a mixture on the encodings),
or on the encoder means (``fit_on = "means"``, pythae's ``GaussianMixtureSampler`` recipe: a
good sampler but not a density for ``q(z)``, since inactive dimensions get near-zero variance).

The density and sampling are torch code (``log_prob`` is differentiable in ``z``, so samplers
and an NCP prior over this base can use it). The fitted mixture lives in buffers, so it travels
in the state dict; ``base`` is the prior the VAE trains against (N(0, I) by default).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import ConfigError, DataError, FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import PriorOverBase, PriorOverBaseConfig, aggregate_posterior_draws

_LOG_2PI = math.log(2 * math.pi)


class GMMPrior(PriorOverBase):
    """A ``K``-component Gaussian mixture over ``D`` latents, fitted with the VAE frozen.

    Buffers: ``log_weights`` ``(K,)``; ``means`` ``(K, D)``; for ``covariance = "full"``
    ``scale_tril`` ``(K, D, D)`` (lower Cholesky factor of ``S_k``) and ``precision_tril``
    ``(K, D, D)`` (``L_k^{-T}``, so ``(z - m)^T S_k^{-1} (z - m) = |(z - m) @ precision_tril_k|^2``);
    for ``"diag"`` ``log_scale`` ``(K, D)``. Unfitted until :meth:`fit` or a fitted state dict.
    Built from ``base`` and a :class:`GMMPrior.Config` (its defaults when None), kept as ``config``.
    """

    name = "gmm"
    fitted_part = "a fitted mixture"

    class Config(PriorOverBaseConfig):
        name: Literal["gmm"] = "gmm"
        components: int = Field(10, ge=1, le=10_000, description="number of mixture components K")
        covariance: Literal["full", "diag"] = Field("full", description="covariance of each "
                                                    "component")
        fit_on: Literal["draws", "means"] = Field(
            "draws", description="fit on draws z ~ q(z|x) (a density for q(z)) or on the encoder "
            "means (pythae's sampler recipe; inactive dims get near-zero variance)")
        draws_per_input: int = Field(1, ge=1, le=100, description="draws of q(z|x) per "
                                     "training input (fit_on = draws)")
        reg_covar: float = Field(1e-6, gt=0, description="added to the covariance diagonals")
        max_iter: int = Field(500, ge=1, description="EM iterations at most")
        n_init: int = Field(1, ge=1, le=100, description="EM restarts (the best is kept)")
        tol: float = Field(1e-4, gt=0, description="EM stops when the mean log-likelihood "
                           "improves by less")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *, seed: int = 0):
        super().__init__(base, config, seed=seed)
        k, d = self.config.components, self.latent_dim
        dtype = torch.get_default_dtype()
        self.register_buffer("log_weights", torch.full((k,), -math.log(k), dtype=dtype))
        self.register_buffer("means", torch.zeros(k, d, dtype=dtype))
        if self.config.covariance == "full":
            eye = torch.eye(d, dtype=dtype).expand(k, d, d).clone()
            self.register_buffer("scale_tril", eye)
            self.register_buffer("precision_tril", eye.clone())
        else:
            self.register_buffer("log_scale", torch.zeros(k, d, dtype=dtype))

    @property
    def label(self) -> str:
        cfg = self.config
        on = ", on means" if cfg.fit_on == "means" else ""
        return f"GMM (K={cfg.components}, {cfg.covariance}{on})"

    # ------------------------------------------------------------------------------------------
    # density and sampling

    def component_log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (..., K)``: ``log pi_k + log N(z; m_k, S_k)`` for every component."""
        self.require_fitted("log_prob")
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(f"latents: expected shape (..., {self.latent_dim}) for a "
                            f"{self.latent_dim}-dim gmm prior, got {tuple(z.shape)}")
        flat = z.reshape(-1, self.latent_dim)
        diff = flat.unsqueeze(1) - self.means  # (n, K, D)
        if self.config.covariance == "full":
            y = torch.einsum("nkd,kde->nke", diff, self.precision_tril)
            log_det = torch.diagonal(self.precision_tril, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
        else:
            y = diff * torch.exp(-self.log_scale)
            log_det = -self.log_scale.sum(-1)
        log_n = -0.5 * (y**2).sum(-1) + log_det - 0.5 * self.latent_dim * _LOG_2PI
        return (self.log_weights + log_n).reshape(*z.shape[:-1], self.config.components)

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the mixture's normalized log density."""
        return torch.logsumexp(self.component_log_prob(z), -1)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``(n, D)``: a component by its weight, then its Gaussian."""
        self.require_fitted("sample")
        device = generator.device if generator is not None else self.means.device
        which = torch.multinomial(self.log_weights.exp().to(device, torch.float64), n,
                                  replacement=True, generator=generator) if n else (
            torch.zeros(0, dtype=torch.long, device=device))
        eps = torch.randn(n, self.latent_dim, generator=generator, device=device,
                          dtype=self.means.dtype)
        which, eps = which.to(self.means.device), eps.to(self.means.device)
        if self.config.covariance == "full":
            offset = (self.scale_tril[which] @ eps.unsqueeze(-1)).squeeze(-1)
        else:
            offset = eps * torch.exp(self.log_scale[which])
        return self.means[which] + offset

    # ------------------------------------------------------------------------------------------
    # fitting

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """EM on ``draws_per_input`` draws of ``q(z|x)`` per row of ``mu``, ``logvar`` ``(N, D)``
        (or on ``mu`` itself with ``fit_on = "means"``), in float64 with scikit-learn; the
        result is copied into the buffers. EM's initialization is seeded from ``generator``
        (default: one seeded with ``seed``). Returns ``converged``, ``n_iter``, the training
        ``mean_log_likelihood`` (nats per latent vector), ``num_points`` and ``fit_seconds``.
        ``log`` is not called (EM has no epochs)."""
        from sklearn.mixture import GaussianMixture

        gen, cfg = options.generator, self.config
        mu64, logvar64 = mu.detach().to(torch.float64), logvar.detach().to(torch.float64)
        if cfg.fit_on == "means":
            points = mu64
        else:
            points = aggregate_posterior_draws(mu64, logvar64, cfg.draws_per_input, gen)
        if len(points) < cfg.components:
            raise ConfigError(f"gmm fit: {len(points)} points cannot fit {cfg.components} "
                              f"components; lower components")
        random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=gen,
                                         device=gen.device).item())
        mixture = GaussianMixture(
            n_components=cfg.components, covariance_type=cfg.covariance,
            reg_covar=cfg.reg_covar, max_iter=cfg.max_iter, n_init=cfg.n_init, tol=cfg.tol,
            random_state=random_state)
        data = points.cpu().numpy()
        mixture.fit(data)
        self.load_mixture(torch.from_numpy(mixture.weights_), torch.from_numpy(mixture.means_),
                          torch.from_numpy(mixture.covariances_))
        self.fit_summary = {
            "converged": bool(mixture.converged_),
            "n_iter": int(mixture.n_iter_),
            "mean_log_likelihood": float(mixture.score(data)),
            "num_points": len(points),
            "fit_seconds": time.perf_counter() - options.started,
        }
        return dict(self.fit_summary)

    @torch.no_grad()
    def load_mixture(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Set the mixture from ``weights`` ``(K,)``, ``means`` ``(K, D)`` and covariances
        ``(K, D, D)`` (full) or variances ``(K, D)`` (diag); marks the prior fitted."""
        k, d = self.config.components, self.latent_dim
        weights, means = weights.to(torch.float64), means.to(torch.float64)
        covariances = covariances.to(torch.float64)
        if weights.shape != (k,) or means.shape != (k, d):
            raise ConfigError(f"gmm: expected weights ({k},) and means ({k}, {d}), got "
                              f"{tuple(weights.shape)} and {tuple(means.shape)}")
        dtype, device = self.means.dtype, self.means.device
        self.log_weights.copy_((weights / weights.sum()).log().to(device, dtype))
        self.means.copy_(means.to(device, dtype))
        if self.config.covariance == "full":
            if covariances.shape != (k, d, d):
                raise ConfigError(f"gmm: expected covariances ({k}, {d}, {d}), got "
                                  f"{tuple(covariances.shape)}")
            tril = torch.linalg.cholesky(covariances)
            eye = torch.eye(d, dtype=torch.float64).expand(k, d, d)
            precision = torch.linalg.solve_triangular(tril, eye, upper=False).transpose(-1, -2)
            self.scale_tril.copy_(tril.to(device, dtype))
            self.precision_tril.copy_(precision.to(device, dtype))
        else:
            if covariances.shape != (k, d):
                raise ConfigError(f"gmm: expected variances ({k}, {d}), got "
                                  f"{tuple(covariances.shape)}")
            self.log_scale.copy_((0.5 * covariances.log()).to(device, dtype))
        self.mark_fitted()


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [GMMPrior]
