"""The ``hierarchical_elbo`` objective: ``-E_q[log p(x|z)] + sum_k beta_k(t) KL_k``.

``KL_k = KL(q(z_k | z_<k, x) || p(z_k | z_<k))`` is analytic given the drawn groups above (both
diagonal Gaussians), per example, summed over the group's dims; reduced as a mean over the batch.
Options (off by default, so the default loss is the ELBO):

``warmup_steps = T``: per-group KL warm-up ``beta_t = min(1, t / T)``; a list gives one ``T`` per
    group (top group first), e.g. a longer warm-up for the lower groups.
``free_bits = lambda``: per group and dim, ``sum_j max(lambda, mean_b KL_kj)``.
``kl_balancing``: NVAE's KL balancing while the warm-up is on (``beta_t < 1``): group k's KL is
    weighted by ``gamma_k = K * kbar_k / sum_j kbar_j``, with ``kbar_k`` the batch-mean KL per dim
    of the group (detached), so groups that carry little are pushed less and stay active.

The logged ``recon``, ``kl``, ``elbo`` are the plain terms (a bound whatever the options), with
``kl_group1`` ... ``kl_groupK`` (scalars) and ``kl_per_dim`` ``(D,)`` (batch means).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import (
    BuildContext,
    ComponentConfig,
    ConfigError,
    LatentModel,
    Objective,
    Prior,
    global_batch_mean,
)


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Elementwise ``KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p))``."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2)
                  * torch.exp(-logvar_p) - 1)


class HierarchicalELBO(Objective):
    """See the module docstring."""

    name = "hierarchical_elbo"

    class Config(ComponentConfig):
        name: Literal["hierarchical_elbo"] = "hierarchical_elbo"
        warmup_steps: int | list[int] = Field(
            0, description="KL warm-up steps T (0: off), or one per group (top group first)")
        free_bits: float = Field(0.0, ge=0, allow_inf_nan=False,
                                 description="free bits in nats per latent dim (0: off)")
        kl_balancing: bool = Field(False, description="NVAE KL balancing during the warm-up")

    def __init__(self, warmup_steps: int | list[int] = 0, free_bits: float = 0.0,
                 kl_balancing: bool = False):
        steps = [warmup_steps] if isinstance(warmup_steps, int) else list(warmup_steps)
        if not steps or any(s < 0 for s in steps):
            raise ConfigError(f"objective.warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = steps
        self.free_bits = float(free_bits)
        self.kl_balancing = bool(kl_balancing)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> HierarchicalELBO:
        return cls(config.warmup_steps, config.free_bits, config.kl_balancing)

    def check_compatible(self, model: LatentModel, prior: Prior) -> None:
        if not hasattr(model, "posterior") or not hasattr(model, "group_sizes"):
            raise ConfigError(f"the hierarchical_elbo objective needs a hierarchical model, got "
                              f"'{model.name}': use model.name = 'hierarchical'")
        if len(self.warmup_steps) not in (1, len(model.group_sizes)):
            raise ConfigError(f"objective.warmup_steps: give one number or one per group "
                              f"({len(model.group_sizes)}), got {self.warmup_steps}")

    def betas(self, step: int, groups: int) -> list[float]:
        """Each group's warm-up weight ``min(1, t / T_k)`` (1 without warm-up)."""
        steps = self.warmup_steps * groups if len(self.warmup_steps) == 1 else self.warmup_steps
        return [1.0 if t <= 0 else min(1.0, step / t) for t in steps]

    def loss(self, batch: Tensor, model: LatentModel, prior: Prior, *, step: int = 0
             ) -> dict[str, Tensor]:
        z, stats = model.posterior(batch)
        recon = model.recon_log_prob(batch, model.decode(z))  # (B,)
        kl_dims = [gaussian_kl(*s) for s in stats]  # K x (B, d_k)
        kl_groups = torch.stack([k.sum(-1) for k in kl_dims], -1)  # (B, K)
        betas = torch.tensor(self.betas(step, len(kl_dims)), dtype=z.dtype, device=z.device)
        if self.free_bits > 0:
            terms = torch.stack([global_batch_mean(k, 0).clamp(min=self.free_bits).sum()
                                 for k in kl_dims])  # (K,)
        else:
            terms = kl_groups.mean(0)
        weights = betas
        if self.kl_balancing and bool((betas < 1).any()):
            per_dim = torch.stack([k.detach().mean() for k in kl_dims]) + 1e-4
            weights = betas * len(kl_dims) * per_dim / per_dim.sum()
        loss = (-recon).mean() + (weights * terms).sum()
        kl = kl_groups.sum(-1)
        per_group = kl_groups.detach().mean(0)
        return {
            "loss": loss,
            "recon": -recon.detach().mean(),
            "kl": kl.detach().mean(),
            "elbo": (recon - kl).detach().mean(),
            **{f"kl_group{k + 1}": value for k, value in enumerate(per_group)},
            "kl_per_dim": torch.cat(kl_dims, -1).detach().mean(0),
        }
