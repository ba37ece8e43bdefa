"""The ``beta_elbo`` objective (Higgins et al. 2017; capacity schedule of Burgess et al. 2018).

Per example ``loss = -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))`` with one reparameterized
sample; reduced as a **sum over pixels and latent dims and a mean over the batch**. (Mixing a
pixel-mean reconstruction with a batch-sum KL silently rescales beta by orders of magnitude.)
With a capacity schedule: ``-E_q[log p(x|z)] + gamma * |KL - C(t)|``, C rising linearly from 0
to ``capacity_max`` over ``capacity_steps`` optimizer steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, ComponentConfig, LatentModel, Objective, Prior, hookimpl

_LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """One draw ``z = mu + exp(logvar / 2) * eps`` per row, ``(B, D)``."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dim."""
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI)).sum(-1)


class BetaELBO(Objective):
    name = "beta_elbo"

    class Config(ComponentConfig):
        name: Literal["beta_elbo"] = "beta_elbo"
        beta: float = Field(1.0, ge=0, description="weight of the KL term (1 = the plain ELBO)")
        capacity_max: float | None = Field(
            None, ge=0, description="target KL in nats at the end of the schedule (None: off)")
        capacity_steps: int = Field(100_000, ge=1, description="steps over which C(t) rises")
        gamma: float = Field(1000.0, gt=0, description="weight of |KL - C(t)| with a capacity")

    def __init__(self, beta: float = 1.0, capacity_max: float | None = None,
                 capacity_steps: int = 100_000, gamma: float = 1000.0):
        self.beta = beta
        self.capacity_max = capacity_max
        self.capacity_steps = capacity_steps
        self.gamma = gamma

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> BetaELBO:
        return cls(config.beta, config.capacity_max, config.capacity_steps, config.gamma)

    def capacity(self, step: int) -> float:
        assert self.capacity_max is not None
        return self.capacity_max * min(1.0, step / self.capacity_steps)

    def loss(self, batch: Tensor, model: LatentModel, prior: Prior, *, step: int = 0
             ) -> dict[str, Tensor]:
        mu, logvar = model.encode(batch)
        z = reparameterize(mu, logvar)
        recon_log_prob = model.recon_log_prob(batch, model.decode(z))  # (B,)
        kl_per_dim = prior.kl_from_gaussian(mu, logvar)  # (B, D) or None
        if kl_per_dim is not None:
            kl = kl_per_dim.sum(-1)
        else:  # single-sample Monte Carlo KL for priors without a closed form
            kl = gaussian_log_prob(z, mu, logvar) - prior.log_prob(z)
        if self.capacity_max is None:
            per_example = -recon_log_prob + self.beta * kl
        else:
            per_example = -recon_log_prob + self.gamma * (kl - self.capacity(step)).abs()
        out = {
            "loss": per_example.mean(),
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
