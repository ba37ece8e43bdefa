"""Building blocks of a learned prior fitted over a base prior (``gmm``, ``flow``, and the tilted
``ncp`` and ``ebm`` of :mod:`ncpvae.tilted`): the ``base`` config field, the class that holds
the base and the config, and the draws of the aggregate posterior they are fitted on.

A prior over a base is built from its config alone::

    prior = GMMPrior(base, GMMPrior.Config(components=3))   # or ncpvae.create("prior", "gmm", ...)

and reads every hyperparameter from ``prior.config``. ``base`` is the tractable prior the VAE
trains against (N(0, I) by default); :meth:`PriorOverBase.from_config` builds it from the
config's ``base`` table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import (
    BuildContext,
    ComponentConfig,
    ConfigError,
    LearnedPrior,
    Prior,
    PriorSection,
    build_component,
)

if TYPE_CHECKING:
    from ncpvae import LatentModel

__all__ = [
    "EpochFitConfig",
    "FitBudgetConfig",
    "PriorOverBase",
    "PriorOverBaseConfig",
    "aggregate_posterior_draws",
    "heldout_draws",
    "per_encoding",
    "seeded_init",
]

T = TypeVar("T")


class PriorOverBaseConfig(ComponentConfig):
    """The config field every prior over a base shares; a subclass narrows ``name`` and adds
    its settings (and may describe ``base`` more precisely)."""

    base: PriorSection = Field(
        default_factory=lambda: {"name": "gaussian"},
        description="the tractable prior the VAE trains against (a prior table)",
    )


class FitBudgetConfig(ComponentConfig):
    """The budget and held-out settings of a fit by minibatch epochs beyond
    ``epochs``/``patience``, shared by every such fit (ncp, ebm, flow, hier_ncp): see
    :class:`ncpvae.EarlyStopping` and docs/priors.md ("Fits that hold on small data")."""

    min_steps: int = Field(
        2000, ge=0, le=10_000_000, description="optimizer steps at least, whatever the data "
        "size (epochs are added on small data; patience covers at least min_steps/4 steps)")
    heldout_samples: int = Field(
        20_000, ge=1, le=10_000_000, description="held-out draws of q(z|x) in all, drawn once: "
        "ceil(heldout_samples / held-out encodings) draws per held-out encoding")


class EpochFitConfig(PriorOverBaseConfig, FitBudgetConfig):
    """A prior over a base fitted by minibatch epochs (ncp, ebm, flow): the base plus
    :class:`FitBudgetConfig`'s settings."""


class PriorOverBase(LearnedPrior):
    """A learned prior fitted over a ``base`` prior, with its settings in ``config``.

    ``base`` (a :class:`~ncpvae.Prior`, a submodule, so its state travels in the state dict)
    gives ``latent_dim``; ``config`` is an instance of the class's ``Config`` (its defaults when
    None); ``seed`` seeds :meth:`fit` when no generator is given (the run seed when built by
    :meth:`from_config`). The prior starts unfitted (a ``fitted`` buffer).
    """

    Config = PriorOverBaseConfig

    def __init__(self, base: Prior, config: ComponentConfig | None = None, *, seed: int = 0):
        if not isinstance(base, Prior):
            raise ConfigError(f"the {self.name} base must be a Prior, got {type(base).__name__}")
        super().__init__(base.latent_dim, self.checked_config(config))
        self.base = base
        self.seed = int(seed)
        self.register_fitted_flag()
        self.fit_summary: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: PriorOverBaseConfig, ctx: BuildContext) -> PriorOverBase:
        """The base from ``config.base``, then the prior, seeded with the run seed."""
        return cls(cls.build_base(config, ctx), config, seed=ctx.seed)

    @classmethod
    def build_base(cls, config: PriorOverBaseConfig, ctx: BuildContext) -> Prior:
        """The base prior of ``config.base`` (``ctx`` must give ``latent_dim``)."""
        ctx.require_latent_dim(f"the {cls.name} prior")
        return build_component(config.base, "prior", ctx)  # type: ignore[return-value]

    @property
    def base_prior(self) -> Prior:
        """The tractable prior the VAE trains against: the base's own ``base_prior`` (the base
        itself for N(0, I) or a VampPrior; N(0, I) under a fitted GMM or flow)."""
        return self.base.base_prior

    def bind_model(self, model: LatentModel) -> None:
        """Pass the model on to the base (a VampPrior base needs the encoder)."""
        self.base.bind_model(model)


def seeded_init(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's global CPU generator seeded with ``seed``, restored afterwards:
    a network initialized from the run seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def aggregate_posterior_draws(mu: Tensor, logvar: Tensor, draws_per_input: int,
                              generator: torch.Generator) -> Tensor:
    """``draws_per_input`` fresh draws ``mu + exp(logvar / 2) * eps`` per row:
    ``(N, D) -> (draws_per_input * N, D)``, noise from ``generator`` (drawn on its device)."""
    out = []
    for _ in range(draws_per_input):
        eps = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=mu.dtype)
        out.append(mu + torch.exp(0.5 * logvar) * eps.to(mu.device))
    return torch.cat(out)


def heldout_draws(mu: Tensor, logvar: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """The fixed held-out draws of a fit: ``ceil(samples / N)`` (at least 1) draws of ``q(z|x)``
    per held-out row of ``mu``, ``logvar`` ``(N, D)``, as :func:`aggregate_posterior_draws`.
    Several draws per encoding make the held-out criterion stable however few encodings are
    held out; drawing them once makes the epochs' losses paired (the same examples)."""
    per_input = max(1, -(-int(samples) // max(1, len(mu))))
    return aggregate_posterior_draws(mu, logvar, per_input, generator)


def per_encoding(values: Tensor, num_encodings: int) -> Tensor:
    """Per-draw held-out values ``(k * N,)`` in the order of :func:`heldout_draws` (draw-major)
    -> their mean per encoding ``(N,)``; the mean of the result is the mean of ``values``.

    The draws of one encoding are correlated, so a standard error over draws understates the
    noise; over encodings it does not. Values of independent extra draws in the same layout
    (NCP's base draws, as many as the positives) may be appended: each encoding then also
    averages its share of them."""
    return values.reshape(-1, num_encodings).mean(0)
