"""The ``flow`` prior: a normalizing flow fitted ex post to the aggregate posterior (docs/priors.md §7).

A masked autoregressive flow (MAF, Papamakarios et al. 2017) or a neural spline flow (NSF,
Durkan et al. 2019), both from **zuko**, fitted by maximum likelihood on fresh draws
``z ~ q(z|x)`` of the training set, with a held-out split for early stopping (the best
held-out weights are kept). Inputs are standardized per dimension with the training draws'
mean and standard deviation first (an affine map whose log-Jacobian is included), so the
spline's bounded domain covers the data.

``log p(z) = log N(u; 0, I) + log |det du/dx| - sum log sigma`` with ``x = (z - shift) / sigma``
and ``u`` the flow's transform of ``x``; sampling pushes ``u ~ N(0, I)`` (from the caller's
generator) through the inverse. The weights and the standardization are in the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ncpvae import ConfigError, FitOptions, Prior, hookimpl
from ncpvae.prior_fitting import seeded_init
from ncpvae_plugins.neural_fit import NeuralFitConfig, StandardizedPrior


def build_zuko_flow(flow_type: str, latent_dim: int, transforms: int, hidden: Sequence[int],
                    bins: int) -> nn.Module:
    """An unconditional zuko flow over ``latent_dim`` features: ``maf`` or ``nsf``."""
    import zuko

    hidden = tuple(int(h) for h in hidden)
    if flow_type == "maf":
        return zuko.flows.MAF(features=latent_dim, transforms=transforms,
                              hidden_features=hidden)
    if flow_type == "nsf":
        return zuko.flows.NSF(features=latent_dim, transforms=transforms, bins=bins,
                              hidden_features=hidden)
    raise ConfigError(f"flow_type must be 'maf' or 'nsf', got '{flow_type}'")


class FlowPrior(StandardizedPrior):
    """A zuko normalizing flow over standardized latents; normalized, exact sampling.

    Built from ``base`` and its :class:`FlowPrior.Config`, which it reads its settings from.
    ``flow`` is a zuko ``Flow`` (calling it gives the distribution): the config's
    ``flow_type``, ``transforms``, ``hidden`` and ``bins``, initialized from ``seed``, unless
    one is passed. Buffers ``shift`` and ``log_sigma`` ``(D,)`` hold the standardization
    (:class:`~ncpvae_plugins.neural_fit.StandardizedPrior`). Unfitted until :meth:`fit` or a
    fitted state dict.
    """

    name = "flow"
    shardable_fit = True
    fitted_part = "a fitted flow"

    class Config(NeuralFitConfig):
        name: Literal["flow"] = "flow"
        flow_type: Literal["maf", "nsf"] = Field("nsf", description="masked autoregressive "
                                                 "flow or neural spline flow (zuko)")
        transforms: int = Field(4, ge=1, le=64, description="number of flow transforms")
        bins: int = Field(8, ge=2, le=256, description="spline bins (nsf)")

    config: Config

    def __init__(self, base: Prior, config: Config | None = None, *,
                 flow: nn.Module | None = None, seed: int = 0):
        super().__init__(base, config, seed=seed)
        cfg = self.config
        if flow is None:
            flow = seeded_init(self.seed, lambda: build_zuko_flow(
                cfg.flow_type, self.latent_dim, cfg.transforms, cfg.hidden, cfg.bins))
        if not isinstance(flow, nn.Module) or not callable(flow):
            raise ConfigError("the flow must be a zuko Flow (an nn.Module returning a "
                              "distribution when called)")
        self.flow = flow

    @property
    def label(self) -> str:
        return f"flow ({self.config.flow_type.upper()})"

    def _nll_x(self, x: Tensor, aux: Tensor | None = None) -> Tensor:
        """``-log p(z)`` ``(n,)`` of standardized rows ``x`` ``(n, D)`` (the fit's loss)."""
        return -(self.flow().log_prob(x) - self.log_sigma.sum())

    def log_prob(self, z: Tensor) -> Tensor:
        """``(..., D) -> (...)``: the flow's exact log density."""
        self.require_fitted("log_prob")
        return self.log_prob_rows(z, lambda x: self.flow().log_prob(x))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``(n, D)``: ``u ~ N(0, I)`` from ``generator`` through the inverse
        transform, then un-standardized."""
        self.require_fitted("sample")
        u = self.standard_normal(n, self.latent_dim, generator)
        with torch.no_grad():
            x = self.flow().transform.inv(u) if n else u
        return self.unstandardize(x)

    def _fit(self, mu: Tensor, logvar: Tensor, options: FitOptions) -> dict[str, Any]:
        """Maximum likelihood on draws of ``q(z|x)`` for ``mu``, ``logvar`` ``(N, D)``: the
        shared loop of :meth:`~ncpvae_plugins.neural_fit.StandardizedPrior.fit_network` (a
        held-out split with fixed draws, fresh draws every epoch, at least ``min_steps`` Adam
        steps, early stopping on the held-out NLL in nats per latent vector, the best weights
        restored, data parallel over ``options.shards``)."""
        return self.fit_network(mu, logvar, options, self._nll_x, desc="fit flow",
                                network="flow")


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [FlowPrior]
