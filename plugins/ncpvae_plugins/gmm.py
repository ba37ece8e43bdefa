"""The ``gmm`` prior: a Gaussian mixture fitted ex post to the aggregate posterior (docs/priors.md §6).

``log p(z) = logsumexp_k [log pi_k + log N(z; m_k, S_k)]`` with ``K`` components and full or
diagonal covariances, fitted by EM (scikit-learn's ``GaussianMixture``) on draws
``z ~ q(z|x)`` of the whole training set (Ghosh et al. 2020 fit such a mixture on the encodings),
or on the encoder means (``fit_on = "means"``, pythae's ``GaussianMixtureSampler`` recipe: a
good sampler but not a density for ``q(z)``, since inactive dimensions get near-zero variance).

By default (``components = "auto"``, ``covariance = "auto"``) the number of components and the
covariance type are chosen on held-out likelihood over a small grid (``component_grid`` x
{diag, full}; docs/priors.md, "Fits that hold on small data"): a full-covariance 10-component
mixture overfits a few thousand encodings. Explicit values fit exactly that mixture.

The density and sampling are torch code (``log_prob`` is differentiable in ``z``, so samplers
and an NCP prior over this base can use it). The fitted mixture lives in buffers, so it travels
in the state dict; ``base`` is the prior the VAE trains against (N(0, I) by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ncpvae import ConfigError, DataError, FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import (
    PriorOverBase,
    PriorOverBaseConfig,
    aggregate_posterior_draws,
    heldout_draws,
)
from ncpvae.tilted import split_heldout

_LOG_2PI = math.log(2 * math.pi)
#: training draws the candidate mixtures of the selection are fitted on, at most (subsampled
#: beyond; the chosen mixture is then refitted on all draws)
SELECTION_POINTS = 20_000
#: a candidate within this many paired SE of the best held-out score counts as a tie, and the
#: tie with fewest parameters is chosen
SELECTION_SE = 2.0


class GMMPrior(PriorOverBase):
    """A ``K``-component Gaussian mixture over ``D`` latents, fitted with the VAE frozen.

    ``K`` and the covariance type are the config's, or chosen by :meth:`fit` when ``"auto"``
    (``components`` and ``covariance`` hold the values in use; a fitted state dict brings its
    own). Buffers: ``log_weights`` ``(K,)``; ``means`` ``(K, D)``; for ``covariance = "full"``
    ``scale_tril`` ``(K, D, D)`` (lower Cholesky factor of ``S_k``) and ``precision_tril``
    ``(K, D, D)`` (``L_k^{-T}``, so ``(z - m)^T S_k^{-1} (z - m) = |(z - m) @ precision_tril_k|^2``);
    for ``"diag"`` ``log_scale`` ``(K, D)``. Unfitted until :meth:`fit` or a fitted state dict.
    Built from ``base`` and a :class:`GMMPrior.Config` (its defaults when None), kept as ``config``.
    """

    name = "gmm"
    fitted_part = "a fitted mixture"
    #: the K and covariance type in use (set by :meth:`set_shape`)
    components: int = 1
    covariance: str = "full"

    class Config(PriorOverBaseConfig):
        name: Literal["gmm"] = "gmm"
        components: Annotated[int, Field(ge=1, le=10_000)] | Literal["auto"] = Field(
            "auto", description="number of mixture components K; auto: chosen on held-out "
            "likelihood from component_grid")
        covariance: Literal["full", "diag", "auto"] = Field(
            "auto", description="covariance of each component; auto: full or diag, chosen on "
            "held-out likelihood")
        component_grid: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
            default_factory=lambda: [1, 2, 3, 5, 10, 20], min_length=1,
            description="the K tried when components = auto")
        heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="fraction of the "
                                        "encodings held out to choose K/covariance (auto)")
        heldout_samples: int = Field(20_000, ge=1, le=10_000_000, description="held-out draws "
                                     "of q(z|x) in all for the choice (several per encoding)")
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
        cfg = self.config
        self.set_shape(cfg.components if cfg.components != "auto" else 1,
                       cfg.covariance if cfg.covariance != "auto" else "full")

    def set_shape(self, components: int, covariance: str) -> None:
        """(Re)create the buffers for ``components`` Gaussians of ``covariance`` ("full" or
        "diag"), as an unfitted standard mixture (an auto choice, a loaded state dict)."""
        k, d = int(components), self.latent_dim
        dtype = self.means.dtype if "means" in self._buffers else torch.get_default_dtype()
        device = self.means.device if "means" in self._buffers else None
        for name in ("scale_tril", "precision_tril", "log_scale"):
            self._buffers.pop(name, None)
        self.register_buffer("log_weights", torch.full((k,), -math.log(k), dtype=dtype,
                                                       device=device))
        self.register_buffer("means", torch.zeros(k, d, dtype=dtype, device=device))
        if covariance == "full":
            eye = torch.eye(d, dtype=dtype, device=device).expand(k, d, d).clone()
            self.register_buffer("scale_tril", eye)
            self.register_buffer("precision_tril", eye.clone())
        else:
            self.register_buffer("log_scale", torch.zeros(k, d, dtype=dtype, device=device))
        self.components, self.covariance = k, covariance

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # a fitted state dict brings its own K and covariance type (an auto choice)
        means = state_dict.get(prefix + "means")
        if isinstance(means, Tensor) and means.ndim == 2:
            covariance = "full" if prefix + "scale_tril" in state_dict else "diag"
            if (means.shape[0], covariance) != (self.components, self.covariance):
                self.set_shape(means.shape[0], covariance)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def label(self) -> str:
        cfg = self.config
        on = ", on means" if cfg.fit_on == "means" else ""
        if "auto" not in (cfg.components, cfg.covariance):
            return f"GMM (K={self.components}, {self.covariance}{on})"
        if not self.is_fitted:  # nothing chosen yet
            return f"GMM (K={cfg.components}, {cfg.covariance}{on})"
        return f"GMM (K={self.components}, {self.covariance}{on}, chosen)"

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
        if self.covariance == "full":
            y = torch.einsum("nkd,kde->nke", diff, self.precision_tril)
            log_det = torch.diagonal(self.precision_tril, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
        else:
            y = diff * torch.exp(-self.log_scale)
            log_det = -self.log_scale.sum(-1)
        log_n = -0.5 * (y**2).sum(-1) + log_det - 0.5 * self.latent_dim * _LOG_2PI
        return (self.log_weights + log_n).reshape(*z.shape[:-1], self.components)

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
        if self.covariance == "full":
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
        ``mean_log_likelihood`` (nats per latent vector), ``num_points``, ``components``,
        ``covariance``, ``fit_seconds`` and, when either is ``"auto"``, ``selection``
        (:meth:`select`). ``log`` is not called (EM has no epochs)."""
        gen, cfg = options.generator, self.config
        mu64, logvar64 = mu.detach().to(torch.float64), logvar.detach().to(torch.float64)
        selection: list[dict[str, Any]] = []
        components, covariance = cfg.components, cfg.covariance
        if components == "auto" or covariance == "auto":
            selection = self.select(mu64, logvar64, gen)
            chosen = next(row for row in selection if row["chosen"])
            components, covariance = chosen["components"], chosen["covariance"]
        points = self._points(mu64, logvar64, cfg.draws_per_input, gen)
        if len(points) < components:
            raise ConfigError(f"gmm fit: {len(points)} points cannot fit {components} "
                              f"components; lower components")
        data = points.cpu().numpy()
        mixture = self._em(data, int(components), str(covariance), gen)
        self.set_shape(int(components), str(covariance))
        self.load_mixture(torch.from_numpy(mixture.weights_), torch.from_numpy(mixture.means_),
                          torch.from_numpy(mixture.covariances_))
        self.fit_summary = {
            "converged": bool(mixture.converged_),
            "n_iter": int(mixture.n_iter_),
            "mean_log_likelihood": float(mixture.score(data)),
            "num_points": len(points),
            "components": self.components,
            "covariance": self.covariance,
            "fit_seconds": time.perf_counter() - options.started,
        }
        if selection:
            self.fit_summary["selection"] = selection
        return dict(self.fit_summary)

    def _points(self, mu: Tensor, logvar: Tensor, draws_per_input: int,
                generator: torch.Generator) -> Tensor:
        """What EM fits: the means ``mu`` (``fit_on = "means"``) or ``draws_per_input`` draws
        of ``q(z|x)`` per row ``(draws_per_input * N, D)``."""
        if self.config.fit_on == "means":
            return mu
        return aggregate_posterior_draws(mu, logvar, draws_per_input, generator)

    def _em(self, data: np.ndarray, components: int, covariance: str,
            generator: torch.Generator) -> Any:
        """A scikit-learn ``GaussianMixture`` fitted by EM on ``data`` ``(n, D)``, its
        initialization seeded from ``generator``."""
        from sklearn.mixture import GaussianMixture

        cfg = self.config
        random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                         device=generator.device).item())
        mixture = GaussianMixture(
            n_components=components, covariance_type=covariance, reg_covar=cfg.reg_covar,
            max_iter=cfg.max_iter, n_init=cfg.n_init, tol=cfg.tol, random_state=random_state)
        return mixture.fit(data)

    def select(self, mu: Tensor, logvar: Tensor,
               generator: torch.Generator) -> list[dict[str, Any]]:
        """Choose ``K`` and the covariance type on held-out likelihood (the ``"auto"`` ones).

        A seeded ``heldout_fraction`` of the rows of ``mu``, ``logvar`` ``(N, D)`` is held out
        (``heldout_samples`` draws in all, several per row; the means with ``fit_on =
        "means"``). Each candidate (``component_grid`` x {diag, full}, or the explicit value) is
        fitted by EM on the other rows' points (at most ``SELECTION_POINTS``) and scored by its
        mean held-out log-likelihood. The chosen candidate is the one with fewest parameters
        whose score is within ``SELECTION_SE`` paired standard errors (over the held-out
        encodings, each scored by the mean over its draws) of the best: on small data, prefer
        the simpler mixture the data cannot tell from the best (the best of a dozen noisy
        scores is itself optimistic by one to two SE). Returns one row
        per candidate: ``components``, ``covariance``, ``parameters``,
        ``heldout_log_likelihood``, ``heldout_se`` (paired, against the best), ``chosen``."""
        cfg = self.config
        held, train = split_heldout(len(mu), cfg.heldout_fraction, generator, mu.device, "gmm")
        points = self._points(mu[train], logvar[train], 1, generator)
        if len(points) > SELECTION_POINTS:
            keep = torch.randperm(len(points), generator=generator, device=generator.device)
            points = points[keep[:SELECTION_POINTS].to(points.device)]
        if cfg.fit_on == "means":
            heldout = mu[held]
        else:
            heldout = heldout_draws(mu[held], logvar[held], cfg.heldout_samples, generator)
        data, heldout_np = points.cpu().numpy(), heldout.cpu().numpy()
        grid: Sequence[int] = (cfg.component_grid if cfg.components == "auto"
                               else [cfg.components])
        types = ("diag", "full") if cfg.covariance == "auto" else (cfg.covariance,)
        candidates = [(k, c) for k in sorted(set(grid)) for c in types if k <= len(data)]
        if not candidates:
            raise ConfigError(f"gmm fit: {len(data)} points cannot fit any of {sorted(grid)} "
                              f"components; lower component_grid")
        # one BLAS/OpenMP thread for the many small fits: scikit-learn's k-means initialization
        # slows down tenfold on an oversubscribed CPU (local to this block, restored after)
        import sklearn.mixture  # noqa: F401  (loaded first: the limits apply to loaded libraries)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            # per held-out encoding: the mean over its draws (draws of one encoding are
            # correlated; the standard errors count encodings, not draws)
            scores = {cand: self._em(data, *cand, generator).score_samples(heldout_np).reshape(
                -1, len(held)).mean(0) for cand in candidates}
        best = max(candidates, key=lambda cand: scores[cand].mean())
        rows = []
        for k, c in candidates:
            diff = scores[best] - scores[(k, c)]
            se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
            rows.append({"components": k, "covariance": c,
                         "parameters": self.parameter_count(k, c),
                         "heldout_log_likelihood": float(scores[(k, c)].mean()),
                         "heldout_se": se, "chosen": False})
        within = [r for r in rows if r["heldout_log_likelihood"] >= float(
            scores[best].mean()) - SELECTION_SE * r["heldout_se"]]
        min(within, key=lambda r: (r["parameters"], -r["heldout_log_likelihood"]))["chosen"] = True
        return rows

    def parameter_count(self, components: int, covariance: str) -> int:
        """Free parameters of a ``components``-Gaussian mixture of ``covariance`` type."""
        d = self.latent_dim
        per = d + (d * (d + 1) // 2 if covariance == "full" else d)
        return components * per + components - 1

    @torch.no_grad()
    def load_mixture(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Set the mixture from ``weights`` ``(K,)``, ``means`` ``(K, D)`` and covariances
        ``(K, D, D)`` (full) or variances ``(K, D)`` (diag); marks the prior fitted."""
        k, d = self.components, self.latent_dim
        weights, means = weights.to(torch.float64), means.to(torch.float64)
        covariances = covariances.to(torch.float64)
        if weights.shape != (k,) or means.shape != (k, d):
            raise ConfigError(f"gmm: expected weights ({k},) and means ({k}, {d}), got "
                              f"{tuple(weights.shape)} and {tuple(means.shape)}")
        dtype, device = self.means.dtype, self.means.device
        self.log_weights.copy_((weights / weights.sum()).log().to(device, dtype))
        self.means.copy_(means.to(device, dtype))
        if self.covariance == "full":
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
