"""The ``hier_ncp`` prior: hierarchical NCP over the model's top-down prior (docs/hierarchical.md).

``p_NCP(z) = prod_k p(z_k | z_<k) exp r_k(z_k, z_<k) / Z_k(z_<k)``, one classifier per latent
group (:mod:`ncpvae.hierarchical`), fitted with the VAE frozen.

What each interface method means here:

- ``sample``: group-wise SIR from ``p_NCP`` (exact as ``sir_candidates`` grows);
- ``kl_gain``: ``sum_k Delta_k`` with every ``log Z_k`` estimated per context (``context_samples``
  base draws each); a given joint ``log_normalizer`` is not used;
- ``log_prob`` / ``energy``: the joint tilt ``log p(z) + sum_k r_k`` (unnormalized), what
  whole-vector samplers (``sir``, ``langevin``) run on; with ``log_normalizer`` (its joint
  ``log E_p[exp sum_k r_k]``) it is the jointly normalized tilt, equal to ``p_NCP`` when every
  ``Z_k`` is constant (optimal classifiers) and an approximation otherwise (§4).

The fit's positives are draws of the flat ``(mu, logvar)`` the runner encodes, which for the
``hierarchical`` model is its posterior along the posterior-mean path (an approximation of the
aggregate posterior ``q(z)``; §6).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, DataError, FitOptions, LatentModel, LearnedPrior
from ncpvae.hierarchical import (
    HierarchicalTilt,
    fit_group_classifiers,
    gain_terms,
    group_gains,
    sample_groupwise_sir,
)
from ncpvae.prior_fitting import FitBudgetConfig, aggregate_posterior_draws, heldout_draws
from ncpvae.tilted import log_mean_exp, split_heldout
from ncpvae_plugins.hierarchical.prior import ModelHierarchicalPrior


class HierarchicalNCPPrior(LearnedPrior):
    """See the module docstring. The classifiers are built when the model is bound (their input
    sizes are the model's groups)."""

    name = "hier_ncp"
    normalized = False
    exact_sampling = False
    sampling_method = "group-wise SIR"
    fitted_part = "trained group classifiers"

    class Config(FitBudgetConfig):
        name: Literal["hier_ncp"] = "hier_ncp"
        hidden: list[Annotated[int, Field(ge=1)]] = Field(
            default_factory=lambda: [128, 128], description="hidden sizes of each classifier")
        activation: Literal["relu", "silu", "gelu", "elu", "tanh", "softplus"] = "silu"
        epochs: int = Field(30, ge=1, le=100_000, description="maximum epochs over the "
                            "aggregate-posterior draws (raised to reach min_steps on small data)")
        patience: int = Field(5, ge=1, description="stop after this many epochs without a "
                              "held-out loss (summed over groups) lower by more than 2 paired SE")
        batch_size: int = Field(256, ge=1)
        lr: float = Field(1e-3, gt=0)
        draws_per_input: int = Field(1, ge=1, description="fresh draws of q(z|x) per training "
                                     "image each epoch")
        heldout_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of the "
                                        "encodings held out for early stopping")
        sir_candidates: int = Field(100, ge=1, description="candidates per group in group-wise "
                                    "SIR")
        context_samples: int = Field(256, ge=2, description="base draws per context for each "
                                     "per-context log Z_k")
        log_z_samples: int = Field(100_000, ge=2, description="base draws for the joint log Z "
                                   "of log_prob")

    config: Config

    def __init__(self, latent_dim: int, config: Config | None = None, *, seed: int = 0):
        super().__init__(latent_dim, self.checked_config(config))
        self.seed = seed
        self.base = ModelHierarchicalPrior(latent_dim)
        self.register_fitted_flag()
        self.tilt = self._build_tilt()
        self.last_ess: list[float] | None = None

    def _build_tilt(self) -> HierarchicalTilt:
        cfg = self.config
        return HierarchicalTilt(self.base.group_sizes, hidden=cfg.hidden,
                                activation=cfg.activation, seed=self.seed)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> HierarchicalNCPPrior:
        return cls(ctx.require_latent_dim(cls.name), config, seed=ctx.seed).to(
            device=ctx.device, dtype=ctx.dtype)

    def bind_model(self, model: LatentModel) -> None:
        like = next(iter(self.tilt.parameters()))
        self.base.bind_model(model)
        if self.tilt.group_sizes != self.base.group_sizes:
            self.tilt = self._build_tilt().to(device=like.device, dtype=like.dtype)

    @property
    def base_prior(self) -> ModelHierarchicalPrior:
        return self.base

    @property
    def label(self) -> str:
        return "hier. NCP"

    # -- fitting -----------------------------------------------------------------------------

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        cfg, gen = self.config, options.generator
        like = next(iter(self.tilt.parameters()))
        mu = mu.detach().to(device=like.device, dtype=like.dtype)
        logvar = logvar.detach().to(device=like.device, dtype=like.dtype)
        held_rows, train_rows = split_heldout(len(mu), cfg.heldout_fraction, gen, like.device,
                                              self.name)
        mu_tr, lv_tr = mu[train_rows], logvar[train_rows]
        heldout = heldout_draws(mu[held_rows], logvar[held_rows], cfg.heldout_samples, gen)

        def resample(generator: torch.Generator) -> Tensor:
            return aggregate_posterior_draws(mu_tr, lv_tr, cfg.draws_per_input, generator)

        latents = resample(gen)
        out = fit_group_classifiers(self.base, self.tilt, latents, epochs=cfg.epochs,
                                    batch_size=cfg.batch_size, lr=cfg.lr, heldout=heldout,
                                    heldout_encodings=len(held_rows), resample=resample,
                                    patience=cfg.patience, min_steps=cfg.min_steps,
                                    generator=gen, progress=options.progress, log=options.log)
        self.mark_fitted()
        held = heldout[:len(held_rows)]  # one draw per held-out encoding for the gains
        summary: dict[str, Any] = {
            **{k: out[k] for k in ("best_epoch", "epochs_run", "steps_run", "min_epochs",
                                   "stopped_early")},
            "num_latents": int(len(latents)), "num_heldout": int(len(held_rows))}
        if len(held) >= 2:
            gains = group_gains(self.base, self.tilt, held, cfg.context_samples,
                                generator=options.generator)
            summary["group_delta"] = [g["delta"] for g in gains]
            summary["group_delta_se"] = [g["se"] for g in gains]
            summary["group_log_z_bias"] = [g["log_z_bias"] for g in gains]
        return summary

    # -- the density ---------------------------------------------------------------------------

    def log_ratio(self, z: Tensor) -> Tensor:
        """``sum_k r_k(z_k, z_<k)``, ``(..., D) -> (...)``."""
        self.require_fitted("log_ratio")
        self.check_latents(z)
        flat = z.reshape(-1, self.latent_dim)
        return self.tilt.group_logits(flat).sum(-1).reshape(z.shape[:-1])

    def log_prob(self, z: Tensor) -> Tensor:
        return self.base.log_prob(z) + self.log_ratio(z)

    def log_normalizer(self, num_samples: int | None = None, *,
                       generator: torch.Generator | None = None) -> tuple[float, float]:
        """The joint ``log E_p[exp sum_k r_k]`` of :meth:`log_prob` and its SE."""
        self.require_fitted("log_normalizer")
        m = self.config.log_z_samples if num_samples is None else int(num_samples)
        values = []
        with torch.no_grad():
            for start in range(0, m, 65_536):
                z = self.base.sample(min(65_536, m - start), generator=generator)
                values.append(self.tilt.group_logits(z).sum(-1))
        return log_mean_exp(torch.cat(values))

    def kl_gain(self, latents: Tensor, *, num_samples: int | None = None,
                generator: torch.Generator | None = None,
                log_normalizer: tuple[float, float] | None = None) -> tuple[float, float]:
        """``sum_k Delta_k`` over the hierarchical base, each ``log Z_k`` per context from
        ``config.context_samples`` draws (``num_samples`` and ``log_normalizer``, which concern
        the joint normalizer, are not used); the SE of the mean of the per-row sums."""
        self.require_fitted("kl_gain")
        if latents.ndim != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] < 2:
            raise DataError(f"kl_gain: expected held-out latents of shape (N, "
                            f"{self.latent_dim}) with N >= 2, got {tuple(latents.shape)}")
        terms, _ = gain_terms(self.base, self.tilt, latents, self.config.context_samples,
                              generator=generator)
        total = terms.sum(-1)
        self._gain_parts = {"group_delta": terms.mean(0).tolist(),
                            "group_delta_se": (terms.std(0) / math.sqrt(len(terms))).tolist()}
        return float(total.mean()), float(total.std() / math.sqrt(total.numel()))

    def gain_parts(self) -> dict[str, list[float]]:
        """Per-group ``Delta_k`` and their SEs (top group first) of the last :meth:`kl_gain`."""
        return dict(getattr(self, "_gain_parts", {}))

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        self.require_fitted("sample")
        z, self.last_ess = sample_groupwise_sir(self.base, self.tilt, n,
                                                self.config.sir_candidates, generator=generator)
        return z

    def sampling_info(self) -> dict[str, float]:
        if not self.last_ess:
            return {}
        return {f"ess_fraction_group{k + 1}": e for k, e in enumerate(self.last_ess)}
