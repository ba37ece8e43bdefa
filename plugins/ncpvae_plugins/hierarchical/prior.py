"""The ``hierarchical`` prior: the model's own top-down prior ``p(z) = prod_k p(z_k | z_<k)``.

The conditionals are part of the hierarchical model (its top-down path); this prior reads them
once the runner binds the model (:meth:`bind_model`); unbound, or bound to a flat model, it is
N(0, I) in one group. It is a
:class:`~ncpvae.hierarchical.HierarchicalPrior` over the concatenated latent, so samplers, the
IW bound and flat priors see an ordinary prior (docs/hierarchical.md §1).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ncpvae import BuildContext, ComponentConfig, LatentModel
from ncpvae.hierarchical import HierarchicalPrior, check_group_sizes


class ModelHierarchicalPrior(HierarchicalPrior):
    """``p(z_k | z_<k)`` from a bound model with ``group_sizes`` and ``prior_conditional``."""

    name = "hierarchical"

    class Config(ComponentConfig):
        name: Literal["hierarchical"] = "hierarchical"

    def __init__(self, latent_dim: int, config: Config | None = None):
        super().__init__((latent_dim,), self.checked_config(config))
        self._model: list[Any] = []  # a list: the model is not a submodule of its prior
        # carries the prior's device and dtype while unbound (not saved in the state dict)
        self.register_buffer("probe", torch.zeros(()), persistent=False)

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> ModelHierarchicalPrior:
        return cls(ctx.require_latent_dim(cls.name), config).to(device=ctx.device,
                                                                dtype=ctx.dtype)

    def bind_model(self, model: LatentModel) -> None:
        """Read the conditionals of a hierarchical model (one with ``group_sizes`` and
        ``prior_conditional``); any other model leaves this prior N(0, I) in one group."""
        if hasattr(model, "prior_conditional") and hasattr(model, "group_sizes"):
            self.group_sizes = check_group_sizes(model.group_sizes, self.latent_dim)
            self._model[:] = [model]
        else:
            self.group_sizes = (self.latent_dim,)
            self._model.clear()

    def conditional(self, k: int, context: Tensor) -> tuple[Tensor, Tensor]:
        if not self._model:  # unbound, or a flat model: N(0, I)
            zeros = self.probe.new_zeros(context.shape[0], self.group_sizes[k])
            return zeros, zeros
        return self._model[0].prior_conditional(k, context)

    def _param_like(self) -> Tensor:
        return self._model[0].log_scale if self._model else super()._param_like()
