"""The ``beta_elbo`` objective (Higgins et al. 2017) and the standard remedies for posterior collapse.

Per example ``loss = -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))`` with one reparameterized
sample; reduced as a **sum over pixels and latent dims and a mean over the batch**. (Mixing a
pixel-mean reconstruction with a batch-sum KL silently rescales beta by orders of magnitude.)
``t`` below is the global optimizer step; ``KL_j`` the per-dimension KL, ``mean_b`` the batch mean.

Options (all off by default, so the default loss is the plain beta-ELBO):

``warmup_steps = T`` -- **KL warm-up** (Bowman et al. 2016; Sønderby et al. 2016):
    ``beta_t = beta * min(1, t / T)``: the KL weight rises linearly from 0. Use it when the decoder
    is strong (deep MLPs, autoregressive or large conv decoders) and latent dimensions die in the
    first epochs: early on the encoder is free to put information into z before the KL pressure
    arrives. A few thousand steps (a few epochs) is usual. The loss before ``T`` is *not* a bound.
``free_bits = lambda`` -- **free bits** (Kingma et al. 2016), per latent dimension:
    ``KL term = sum_j max(lambda, mean_b KL_j)``: a dimension carrying fewer than ``lambda`` nats
    per example (batch average) is not pushed further towards the prior, so it can stay active.
    Use it when a few units collapse even with warm-up; ``lambda`` of 0.1-0.5 nats per dimension is
    typical. Needs a prior with a closed-form per-dimension KL (the Gaussian base prior).
    Combines with warm-up (``beta_t * sum_j max(lambda, mean_b KL_j)``).
``capacity_max = C_max`` -- **capacity schedule** (Burgess et al. 2018):
    ``loss = mean_b(-E_q[log p(x|z)]) + gamma * |mean_b KL - C(t)|``, on the **batch-mean** KL (as
    in Burgess et al. and disentanglement_lib), with ``C(t) = C_max * min(1, t / capacity_steps)``.
    Replaces beta; cannot be combined with warm-up or free bits.

The logged ``recon``, ``kl`` and ``elbo`` are always the plain (unweighted) terms, so the reported
ELBO stays a bound whatever the options.

Under ``torchrun`` each rank holds a shard of the global batch. The free-bits and capacity terms are
nonlinear in a batch mean, so they take it over the **global** batch
(:func:`ncpvae.global_batch_mean`: a differentiable all-reduce of the shard sums): loss and
gradients then equal the single-process run's up to float reduction order. One process computes
exactly the plain ``.mean``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ncpvae import (
    BuildContext,
    ComponentConfig,
    ConfigError,
    LatentModel,
    Objective,
    Prior,
    global_batch_mean,
    hookimpl,
    reparameterize,
)

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dim."""
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI)).sum(-1)


class BetaELBO(Objective):
    """The beta-ELBO, optionally with KL warm-up, free bits or a capacity schedule.

    ``-E_q[log p(x|z)] + beta_t * KL`` (sum over pixels and latent dims, mean over the batch).
    When to use the remedies for posterior collapse (few active units, KL near 0 in most dims):
    ``warmup_steps`` (beta_t = beta * min(1, t / T); Bowman et al. 2016, Sønderby et al. 2016)
    for strong decoders whose latents die in the first epochs (a few epochs' worth of steps);
    ``free_bits`` (sum_j max(lambda, mean_b KL_j); Kingma et al. 2016) when units still collapse
    with warm-up, lambda ~0.1-0.5 nats per dim (Gaussian base prior only). Both leave the
    logged ELBO a true bound. ``capacity_max`` (Burgess et al. 2018) replaces beta by
    ``gamma * |mean_b KL - C(t)|`` for disentanglement studies.
    """

    name = "beta_elbo"

    class Config(ComponentConfig):
        name: Literal["beta_elbo"] = "beta_elbo"
        beta: float = Field(1.0, ge=0, allow_inf_nan=False,
                            description="weight of the KL term (1 = the plain ELBO)")
        warmup_steps: int = Field(
            0, ge=0, description="KL warm-up: beta_t = beta * min(1, t / warmup_steps) (0: off)")
        free_bits: float = Field(
            0.0, ge=0, allow_inf_nan=False,
            description="free bits: nats per latent dim below which the batch-mean KL is not "
                        "penalized, sum_j max(lambda, mean_b KL_j) (0: off)")
        capacity_max: float | None = Field(
            None, ge=0, allow_inf_nan=False,
            description="target KL in nats at the end of the schedule (None: off)")
        capacity_steps: int = Field(100_000, ge=1, description="steps over which C(t) rises")
        gamma: float = Field(1000.0, gt=0, allow_inf_nan=False,
                             description="weight of |mean_b KL - C(t)| with a capacity")

        @model_validator(mode="after")
        def _one_regime(self) -> BetaELBO.Config:
            if self.capacity_max is not None and (self.warmup_steps or self.free_bits):
                raise ValueError(
                    "capacity_max replaces beta: drop warmup_steps and free_bits, or set "
                    "capacity_max = None to use them")
            return self

    def __init__(self, beta: float = 1.0, capacity_max: float | None = None,
                 capacity_steps: int = 100_000, gamma: float = 1000.0, *,
                 warmup_steps: int = 0, free_bits: float = 0.0):
        if capacity_max is not None and (warmup_steps or free_bits):
            raise ConfigError("beta_elbo: capacity_max replaces beta; drop warmup_steps and "
                              "free_bits, or set capacity_max = None")
        self.beta = beta
        self.capacity_max = capacity_max
        self.capacity_steps = capacity_steps
        self.gamma = gamma
        self.warmup_steps = int(warmup_steps)
        self.free_bits = float(free_bits)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> BetaELBO:
        return cls(config.beta, config.capacity_max, config.capacity_steps, config.gamma,
                   warmup_steps=config.warmup_steps, free_bits=config.free_bits)

    def check_compatible(self, model: LatentModel, prior: Prior) -> None:
        if self.free_bits > 0:
            probe = torch.zeros(1, model.latent_dim)
            if prior.kl_from_gaussian(probe, probe) is None:
                raise ConfigError(
                    f"objective.free_bits needs a prior with a closed-form per-dimension KL; "
                    f"the '{prior.name}' prior has none: set free_bits = 0 or use a Gaussian "
                    "base prior")

    def capacity(self, step: int) -> float:
        """``C(t) = capacity_max * min(1, t / capacity_steps)`` in nats."""
        assert self.capacity_max is not None
        return self.capacity_max * min(1.0, step / self.capacity_steps)

    def beta_at(self, step: int) -> float:
        """``beta_t = beta * min(1, t / warmup_steps)``; ``beta`` without warm-up."""
        if self.warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    def loss(self, batch: Tensor, model: LatentModel, prior: Prior, *, step: int = 0
             ) -> dict[str, Tensor]:
        """``batch`` ``(B, C, H, W)``; returns scalars ``loss``, ``recon``, ``kl``, ``elbo`` and,
        with a closed-form KL, ``kl_per_dim`` ``(D,)`` (batch means)."""
        mu, logvar = model.encode(batch)
        z = reparameterize(mu, logvar)
        recon_log_prob = model.recon_log_prob(batch, model.decode(z))  # (B,)
        kl_per_dim = prior.kl_from_gaussian(mu, logvar)  # (B, D) or None
        if kl_per_dim is not None:
            kl = kl_per_dim.sum(-1)
        else:  # single-sample Monte Carlo KL for priors without a closed form
            kl = gaussian_log_prob(z, mu, logvar) - prior.log_prob(z)
        if self.capacity_max is not None:
            # Burgess et al. (2018): the capacity term acts on the batch-mean KL (of the global
            # batch under torchrun: every rank's shard takes part)
            batch_kl = global_batch_mean(kl, 0)
            loss = (-recon_log_prob).mean() + self.gamma * (batch_kl - self.capacity(step)).abs()
        elif self.free_bits > 0:
            if kl_per_dim is None:
                raise ConfigError(f"objective.free_bits needs a closed-form per-dimension KL; "
                                  f"the '{prior.name}' prior has none: set free_bits = 0")
            # the per-dimension batch means of the global batch under torchrun
            kl_term = global_batch_mean(kl_per_dim, 0).clamp(min=self.free_bits).sum()
            loss = (-recon_log_prob).mean() + self.beta_at(step) * kl_term
        else:
            per_example = -recon_log_prob + self.beta_at(step) * kl
            loss = per_example.mean()
        out = {
            "loss": loss,
            "recon": -recon_log_prob.detach().mean(),
            "kl": kl.detach().mean(),
            "elbo": (recon_log_prob - kl).detach().mean(),
        }
        if kl_per_dim is not None:
            out["kl_per_dim"] = kl_per_dim.detach().mean(0)
        return out


@hookimpl
def ncpvae_register_objectives() -> list[type]:
    return [BetaELBO]
