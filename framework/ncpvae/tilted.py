"""Tilted priors ``p(z) = b(z) exp f(z) / Z`` over a base prior ``b`` (docs/priors.md §3).

The shared part of the NCP prior (``f`` from a noise-contrastive classifier) and the latent EBM
prior (``f`` fitted by maximum likelihood with Langevin negatives): the MLP for ``f``, the density
and energy, the Monte Carlo ``log Z``, the gain over the base, and SIR sampling. Subclasses add
``fit`` (how ``f`` is learned) and their config.

The base ``b`` can be any prior that samples exactly: N(0, I), or a fitted learned prior (a GMM,
a flow) or a VampPrior. When the base is itself a :class:`~ncpvae.LearnedPrior` it is fitted
first by :meth:`TiltedPrior.fit_base`, and

- ``base_prior`` is the base's own ``base_prior`` (the tractable prior the VAE trains against);
- ``log_ratio(z) = f(z) + base.log_ratio(z)`` and ``log_normalizer = log E_b[exp f] + log Z_b``,
  so :meth:`kl_gain` is the gain over ``base_prior`` (N(0, I)), as for every learned prior;
- :meth:`kl_gain_over_base` is ``Delta = E_q[f] - log E_b[exp f]``, the gain over ``b`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import (
    ConfigError,
    DataError,
    FitOptions,
    LearnedPrior,
    NonFiniteError,
    Prior,
    PriorSection,
)
from ncpvae.mcmc import ess_fraction, sampling_importance_resampling
from ncpvae.prior_fitting import PriorOverBase, PriorOverBaseConfig, seeded_init

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}

#: Rows per network call when evaluating many latents without gradients (bounds memory).
EVAL_CHUNK = 65_536
#: Candidates per SIR pool: larger requests are split into pools of about this size.
SIR_POOL = 1 << 20


__all__ = [
    "MLPClassifier",
    "TiltedConfig",
    "TiltedPrior",
    "log_mean_exp",
    "split_heldout",
]


class TiltedConfig(PriorOverBaseConfig):
    """The config fields every tilted prior shares: the base ``b``, the MLP for ``f``
    (:class:`MLPClassifier`), and how SIR and ``log Z`` draw from the base. A subclass narrows
    ``name`` and adds its fitting settings."""

    base: PriorSection = Field(
        default_factory=lambda: {"name": "gaussian"},
        description="the base prior b that exp f reweights (a prior table); it must sample "
                    "exactly",
    )
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [256, 256], description="hidden layer sizes of the MLP f"
    )
    activation: Literal["relu", "silu", "gelu", "elu", "tanh", "softplus"] = Field(
        "silu", description="MLP activation (smooth ones give Langevin samplers smooth energies)"
    )
    normalization: Literal["none", "layer"] = Field(
        "none", description="normalization after each hidden layer (batch norm is not offered: "
        "it would couple the rows of a batch)"
    )
    sir_candidates: int = Field(
        100, ge=1, le=100_000, description="base-prior candidates per SIR sample"
    )
    log_z_samples: int = Field(
        100_000, ge=2, description="base-prior draws for the Monte Carlo estimate of log Z"
    )


class MLPClassifier(nn.Module):
    """The tilt ``f``: an MLP mapping latents ``(n, D)`` to scalars ``(n,)`` (NCP's logit, the
    EBM's negative energy).

    Linear layers of sizes ``hidden``, each followed by an optional LayerNorm and the activation,
    then a linear head. Only row-wise layers are used (no batch norm), so the output of row i
    depends on ``z[i]`` alone and the energy stays batch-separable. The head starts at zero,
    so an untrained network gives ``f = 0``: the tilted prior starts as its base.
    """

    def __init__(self, latent_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "silu", normalization: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation '{activation}'; choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        if normalization not in ("none", "layer"):
            raise ConfigError(f"normalization must be 'none' or 'layer', got '{normalization}'")
        layers: list[nn.Module] = []
        width = latent_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if normalization == "layer":
                layers.append(nn.LayerNorm(size))
            layers.append(ACTIVATIONS[activation]())
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: Tensor) -> Tensor:
        """``(n, D) -> (n,)``."""
        return self.head(self.body(z)).squeeze(-1)


def log_mean_exp(values: Tensor) -> tuple[float, float]:
    """``log mean exp(values)`` and its delta-method standard error, in float64.

    With ``w_i = exp(values_i)`` and ``Z-hat = mean(w)``: ``SE(log Z-hat) = SE(Z-hat) / Z-hat``
    ``= std(w / Z-hat) / sqrt(M)``. Written so that all-equal values give an exact result and
    a zero standard error.
    """
    v = values.detach().to(torch.float64).reshape(-1)
    m = v.numel()
    if torch.isnan(v).any() or torch.isposinf(v).any():
        raise NonFiniteError("the tilt f returned NaN or +inf on base-prior draws")
    top = v.max()
    if torch.isneginf(top):
        raise NonFiniteError("every value of the tilt f is -inf on base-prior draws")
    scaled = torch.exp(v - top)
    mean = scaled.sum() / m
    log_z = float(top + torch.log(mean))
    if m < 2:
        return log_z, float("inf")
    relative = scaled / mean
    se = float(torch.sqrt(((relative - 1.0) ** 2).sum() / (m - 1) / m))
    return log_z, se


def split_heldout(n_total: int, fraction: float, generator: torch.Generator,
                  device: torch.device, who: str) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n_total)`` into held-out and training indices."""
    n_held = max(1, round(fraction * n_total))
    if n_total - n_held < 1:
        raise DataError(f"{who} fit: need at least 2 encodings (training and held-out rows), "
                        f"got {n_total}")
    order = torch.randperm(n_total, generator=generator, device=generator.device).to(device)
    return order[:n_held], order[n_held:]


class TiltedPrior(PriorOverBase):
    """``p(z) = b(z) exp f(z) / Z`` with ``Z = E_b[exp f]``: a base ``b`` tilted by a network ``f``.

    Built from ``base`` (any prior with exact sampling) and ``config`` (the subclass's
    ``Config``, a :class:`TiltedConfig`; its defaults when None), which every setting is read
    from.
    ``net`` maps latents ``(n, D)`` to ``(n,)``; by default the config's
    :class:`MLPClassifier`, initialized from ``seed`` without touching the global RNG. The
    prior is unfitted unless ``fitted=True`` (``net`` then taken as trained); loading a fitted
    state dict marks it fitted. ``log_prob`` is unnormalized (subtract :meth:`log_normalizer`);
    ``sample`` is SIR from the base with weights ``exp f`` (``config.sir_candidates`` base
    draws per sample); ``config.log_z_samples`` base draws estimate ``log Z``. Subclasses
    implement ``_fit``.
    """

    normalized = False
    requires_fit = True
    exact_sampling = False
    sampling_method = "SIR"
    #: what the subclass calls ``f`` in error messages
    net_role: ClassVar[str] = "network"
    #: what it calls the network's outputs
    net_output: ClassVar[str] = "values"
    fitted_part: ClassVar[str] = "a trained network"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "fitted_part" not in cls.__dict__:  # the not-fitted error names the network
            cls.fitted_part = f"a trained {cls.net_role}"

    Config = TiltedConfig
    config: TiltedConfig

    def __init__(self, base: Prior, config: TiltedConfig | None = None, *,
                 net: nn.Module | None = None, seed: int = 0, fitted: bool = False):
        if isinstance(base, Prior) and not base.exact_sampling:
            raise ConfigError(
                f"the {self.name} base prior must sample exactly (it provides the negatives and "
                f"the SIR proposals); '{base.name}' does not: use e.g. base = gaussian, gmm, flow "
                f"or vamp"
            )
        super().__init__(base, config, seed=seed)
        if net is None:
            cfg = self.config
            net = seeded_init(self.seed, lambda: MLPClassifier(
                self.latent_dim, cfg.hidden, cfg.activation, cfg.normalization))
        if not isinstance(net, nn.Module):
            raise ConfigError(
                f"the {self.name} {self.net_role} must be a torch.nn.Module, got "
                f"{type(net).__name__}"
            )
        self.classifier = net
        if fitted:
            self.mark_fitted()
        self.last_ess_fraction: float | None = None
        self.history: list[dict[str, float]] = []
        self.heldout_index: Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # the base

    @property
    def base_is_learned(self) -> bool:
        return isinstance(self.base, LearnedPrior)

    def fit_base(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Fit a learned base on the same encodings (first, before ``f``), with the fit's
        generator, progress setting and shards; ``{}`` otherwise. The generator is only
        consumed when there is something to fit, so a fit over a fixed base (N(0, I)) draws
        exactly as before."""
        if not self.base_is_learned:
            return {}
        assert isinstance(self.base, LearnedPrior)
        # only a shardable base takes the group (a prior overriding ``fit`` may not accept it)
        sharded = {"shards": options.shards} if self.base.shardable_fit else {}
        return dict(self.base.fit(mu, logvar, generator=options.generator,
                                  progress=options.progress, **sharded))

    # ------------------------------------------------------------------------------------------
    # the density

    def logit(self, z: Tensor) -> Tensor:
        """The tilt ``f(z)``: ``(..., D) -> (...)`` (no fitted check).

        Raises :class:`DataError` if the network does not return one value per row.
        """
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise DataError(
                f"latents: expected shape (..., {self.latent_dim}) for a {self.latent_dim}-dim "
                f"{self.name} prior, got {tuple(z.shape)}"
            )
        flat = z.reshape(-1, self.latent_dim)
        out = self.classifier(flat)
        if not isinstance(out, Tensor) or out.shape != (flat.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DataError(
                f"the {self.name} {self.net_role} must map latents (n, {self.latent_dim}) to "
                f"{self.net_output} (n,), but for n={flat.shape[0]} it returned {got}; end it with e.g. "
                f".squeeze(-1) after a Linear(..., 1) layer"
            )
        return out.reshape(z.shape[:-1])

    @torch.no_grad()
    def _logit_nograd(self, z: Tensor) -> Tensor:
        """``f(z)`` for many rows ``(n, D) -> (n,)``, in chunks and without a graph."""
        return torch.cat([self.logit(part) for part in z.split(EVAL_CHUNK)]) if len(z) else (
            z.new_zeros(0))

    def log_prob(self, z: Tensor) -> Tensor:
        """Unnormalized ``log b(z) + f(z)``, ``(..., D) -> (...)``; subtract ``log Z`` (see
        :meth:`log_normalizer`) for the normalized log density."""
        self.require_fitted("log_prob")
        return self.base.log_prob(z) + self.logit(z)

    def energy(self, z: Tensor) -> Tensor:
        """``U(z) = -log b(z) - f(z)``, ``(..., D) -> (...)``; ``log b`` is the base's log
        density summed over the latent dimensions. Batch-separable."""
        self.require_fitted("energy")
        return -self.base.log_prob(z) - self.logit(z)

    def log_normalizer_over_base(
        self, num_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """Monte Carlo ``log E_b[exp f(z)]`` over ``num_samples`` base draws (default
        ``config.log_z_samples``) and its delta-method SE; biased low by about half the squared
        SE."""
        self.require_fitted("log_normalizer")
        m = self.config.log_z_samples if num_samples is None else int(num_samples)
        if m < 2:
            raise ConfigError(f"log_normalizer needs at least 2 samples, got {m}")
        values = []
        with torch.no_grad():
            for start in range(0, m, EVAL_CHUNK):
                z = self.base.sample(min(EVAL_CHUNK, m - start), generator=generator)
                values.append(self.logit(z).to(torch.float64))
        return log_mean_exp(torch.cat(values))

    def log_normalizer(
        self, num_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[float, float]:
        """``log Z`` of :meth:`log_prob` and its SE: ``log E_b[exp f]`` (see
        :meth:`log_normalizer_over_base`) plus the base's own ``log Z`` when the base is an
        unnormalized learned prior (SEs in quadrature). Plain floats."""
        log_z, se = self.log_normalizer_over_base(num_samples, generator=generator)
        if self.base_is_learned and not self.base.normalized:
            assert isinstance(self.base, LearnedPrior)
            base_z, base_se = self.base.log_normalizer(num_samples, generator=generator)
            return log_z + base_z, math.sqrt(se**2 + base_se**2)
        return log_z, se

    def log_ratio(self, z: Tensor) -> Tensor:
        """``log p(z) - log p_base_prior(z)`` without ``log Z``: ``f(z)`` over a fixed base,
        ``f(z) + base.log_ratio(z)`` over a learned one."""
        self.require_fitted("kl_gain")
        f = self.logit(z)
        if self.base is self.base_prior:
            return f
        if self.base_is_learned:
            assert isinstance(self.base, LearnedPrior)
            return f + self.base.log_ratio(z)
        return f + self.base.log_prob(z) - self.base_prior.log_prob(z)

    def kl_gain_over_base(
        self,
        latents: Tensor,
        *,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[float, float]:
        """``Delta = E_q[f(z)] - log E_b[exp f]``: the gain over the base ``b`` itself (equal to
        :meth:`kl_gain` over N(0, I) when the base is N(0, I)), on held-out draws ``latents``
        ``(N, D)``; plain floats ``(delta, se)``."""
        self.require_fitted("kl_gain")
        if latents.ndim != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] < 2:
            raise DataError(
                f"kl_gain: expected held-out latents of shape (N, {self.latent_dim}) with N >= 2, "
                f"got {tuple(latents.shape)}"
            )
        ref = self._param_like()
        f = self._logit_nograd(latents.to(device=ref.device, dtype=ref.dtype)).to(torch.float64)
        log_z, se_z = self.log_normalizer_over_base(num_samples, generator=generator)
        se_mean = float(f.std() / math.sqrt(f.numel()))
        return float(f.mean()) - log_z, math.sqrt(se_mean**2 + se_z**2)

    def sampling_info(self) -> dict[str, float]:
        """The Kish ESS fraction of the last SIR call (absent before any)."""
        return {} if self.last_ess_fraction is None else {"ess_fraction": self.last_ess_fraction}

    # ------------------------------------------------------------------------------------------
    # sampling

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` approximate draws ``(n, D)`` by SIR (see :meth:`sample_with_info`)."""
        return self.sample_with_info(n, generator=generator)[0]

    def sample_with_info(
        self, n: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """SIR: draw ``n * config.sir_candidates`` base candidates, weight them by ``exp f``,
        resample (multinomial, with replacement, in pools of about a million candidates). Returns
        ``(z (n, D), {"ess_fraction": ...})``; the ESS fraction is also kept as
        ``self.last_ess_fraction``."""
        self.require_fitted("sample")
        if n < 0:
            raise ValueError(f"cannot draw a negative number of samples ({n})")
        if n == 0:
            ref = self._param_like()
            return torch.empty(0, self.latent_dim, device=ref.device, dtype=ref.dtype), {
                "ess_fraction": float("nan")}
        draws, log_weights = sampling_importance_resampling(
            lambda m: self.base.sample(m, generator=generator), self._logit_nograd, n,
            self.config.sir_candidates, pool_size=SIR_POOL, generator=generator)
        ess = ess_fraction(log_weights)
        self.last_ess_fraction = ess
        return draws, {"ess_fraction": ess}
