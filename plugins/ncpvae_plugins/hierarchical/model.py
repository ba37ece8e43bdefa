"""The ``hierarchical`` model: a top-down hierarchical VAE with vector latent groups (LVAE /
NVAE style; docs/hierarchical.md §1).

The latent ``z`` ``(B, D)`` is K groups of about ``D / K`` dims, top group first.

- **Bottom-up**: stride-2 convolution stages with residual cells (as many as halve the image:
  28 -> 2, 32 -> 3, 64 -> 4), then a dense layer to features ``h`` ``(B, H)``; a chain of residual
  cells gives one feature per group, ``d_K = h`` and ``d_k = cell_k(d_{k+1})`` (the top group sees
  the deepest features).
- **Top-down**: a state ``s_0 = 0`` ``(B, H)``; for each group the prior
  ``p(z_k | z_<k) = N(mu_p, exp(logvar_p))`` from ``s_{k-1}`` (``N(0, I)`` for the top group) and
  the posterior ``q(z_k | z_<k, x) = N(mu_p + dmu, exp(logvar_p + dlogvar))`` from
  ``(s_{k-1}, d_k)`` (NVAE's residual parametrization: the posterior is a correction of the
  prior); then ``s_k = cell(s_{k-1} + W_k z_k)``.
- **Decoder**: ``s_K`` -> dense -> transposed convolutions -> likelihood parameters.

``encode`` returns the flat ``(mu, logvar)`` along the posterior-mean path (each ``z_k`` set to its
posterior mean): a diagonal Gaussian over the concatenated latent for the flat tools (importance
proposals, flat priors fitted on the concatenated latent). The objective uses :meth:`posterior`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import BuildContext, ConfigError, LatentModel, reparameterize
from ncpvae.hierarchical import check_group_sizes
from ncpvae_plugins.models import LikelihoodFields, _require_image_shape, num_halvings


def split_evenly(latent_dim: int, groups: int) -> list[int]:
    """``min(groups, latent_dim)`` group sizes as equal as possible, the larger ones on top
    (``split_evenly(10, 3) == [4, 3, 3]``)."""
    if groups < 1 or latent_dim < 1:
        raise ConfigError(f"need groups >= 1 and latent_dim >= 1, got {groups} and {latent_dim}")
    k = min(groups, latent_dim)
    return [latent_dim // k + (1 if i < latent_dim % k else 0) for i in range(k)]


class ResidualCell(nn.Module):
    """``x + W2 silu(W1 silu(x))`` on ``(B, H)``; ``W2`` starts at zero (the identity)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, width))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvResidualCell(nn.Module):
    """``x + conv(silu(conv(silu(x))))`` on ``(B, C, H, W)`` (3x3, same size)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * self.body(x)


class HierarchicalVAE(LatentModel):
    """See the module docstring; the groups are :func:`split_evenly`."""

    name = "hierarchical"

    class Config(LikelihoodFields):
        name: Literal["hierarchical"] = "hierarchical"
        groups: int = Field(2, ge=2, le=4, description="number of latent groups K (sizes as "
                            "equal as possible, the larger on top; at most latent_dim)")
        channels: int = Field(32, ge=1, description="channels of every conv stage")
        hidden: int = Field(256, ge=1, description="width H of the bottom-up features and the "
                            "top-down state")

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, groups: int = 2,
                 channels: int = 32, hidden: int = 256, **likelihood):
        super().__init__(latent_dim, **likelihood)
        self.group_sizes = check_group_sizes(split_evenly(latent_dim, groups), latent_dim)
        groups = len(self.group_sizes)
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        stages = min(num_halvings(h), num_halvings(w))
        if stages == 0:
            raise ConfigError(f"the hierarchical model needs an even image size >= 8, got "
                              f"{h}x{w}")
        self.feature_shape = (channels, h >> stages, w >> stages)
        flat = channels * (h >> stages) * (w >> stages)
        enc: list[nn.Module] = []
        in_ch = c
        for _ in range(stages):
            enc += [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), ConvResidualCell(channels)]
            in_ch = channels
        enc += [nn.Flatten(), nn.Linear(flat, hidden)]
        self.bottom_up = nn.Sequential(*enc)
        self.bottom_up_cells = nn.ModuleList(ResidualCell(hidden) for _ in range(groups - 1))
        self.prior_heads = nn.ModuleList(nn.Linear(hidden, 2 * d) for d in self.group_sizes[1:])
        self.posterior_heads = nn.ModuleList(nn.Linear(2 * hidden, 2 * d)
                                             for d in self.group_sizes)
        self.latent_in = nn.ModuleList(nn.Linear(d, hidden) for d in self.group_sizes)
        self.top_down_cells = nn.ModuleList(ResidualCell(hidden) for _ in self.group_sizes)
        for head in self.prior_heads:  # the prior starts as N(0, I) in every group
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.hidden = hidden
        dec: list[nn.Module] = []
        for i in range(stages):
            dec += [ConvResidualCell(channels),
                    nn.ConvTranspose2d(channels, c if i == stages - 1 else channels, 4, stride=2,
                                       padding=1)]
        self.decoder_dense = nn.Sequential(nn.Linear(hidden, flat), nn.SiLU())
        self.decoder_conv = nn.Sequential(*dec)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> HierarchicalVAE:
        shape = _require_image_shape(ctx, "the hierarchical model")
        return cls(shape, ctx.require_latent_dim(cls.name), config.groups, config.channels,
                   config.hidden, **config.likelihood_kwargs(shape))

    # -- the top-down path -----------------------------------------------------------------

    def _state0(self, n: int, like: Tensor) -> Tensor:
        return like.new_zeros(n, self.hidden)

    def _advance(self, k: int, state: Tensor, z_k: Tensor) -> Tensor:
        return self.top_down_cells[k](state + self.latent_in[k](z_k))

    def _prior_params(self, k: int, state: Tensor) -> tuple[Tensor, Tensor]:
        if k == 0:
            zeros = state.new_zeros(state.shape[0], self.group_sizes[0])
            return zeros, zeros
        mu, logvar = self.prior_heads[k - 1](state).chunk(2, dim=-1)
        return mu, logvar

    def top_down_state(self, k: int, context: Tensor) -> Tensor:
        """``s_k`` after the groups in ``context`` ``(n, sum_{j<k} d_j)``: ``(n, H)``."""
        state = self._state0(context.shape[0], context)
        for j, z_j in enumerate(context.split(list(self.group_sizes[:k]), dim=-1)):
            state = self._advance(j, state, z_j)
        return state

    def prior_conditional(self, k: int, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` of ``p(z_k | z_<k = context)``, each ``(n, d_k)``."""
        return self._prior_params(k, self.top_down_state(k, context))

    def posterior(self, x: Tensor, *, sample: bool = True,
                  generator: torch.Generator | None = None
                  ) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """One draw ``z ~ q(z | x)`` ``(B, D)`` (posterior means when ``sample`` is False) and,
        per group, ``(mu_q, logvar_q, mu_p, logvar_p)`` each ``(B, d_k)``: the posterior and the
        prior conditional given the drawn groups above."""
        d = self.bottom_up(x)
        features = [d]
        for cell in self.bottom_up_cells:
            features.append(cell(features[-1]))
        features.reverse()  # features[0]: the deepest, for the top group
        state = self._state0(x.shape[0], d)
        groups, stats = [], []
        for k in range(len(self.group_sizes)):
            mu_p, logvar_p = self._prior_params(k, state)
            dmu, dlogvar = self.posterior_heads[k](torch.cat([state, features[k]], -1)).chunk(2, -1)
            mu_q, logvar_q = mu_p + dmu, logvar_p + dlogvar
            z_k = reparameterize(mu_q, logvar_q, generator=generator) if sample else mu_q
            stats.append((mu_q, logvar_q, mu_p, logvar_p))
            groups.append(z_k)
            state = self._advance(k, state, z_k)
        return torch.cat(groups, -1), stats

    # -- the LatentModel interface ---------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flat ``(mu, logvar)`` ``(B, D)`` along the posterior-mean path (module docstring)."""
        _, stats = self.posterior(x, sample=False)
        return torch.cat([s[0] for s in stats], -1), torch.cat([s[1] for s in stats], -1)

    def decode(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        state = self.top_down_state(len(self.group_sizes), flat)
        features = self.decoder_dense(state).view(-1, *self.feature_shape)
        return self.decoder_conv(features).view(*lead, *self.image_shape)
