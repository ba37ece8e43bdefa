"""Hierarchical VAE plugins (docs/hierarchical.md): the ``hierarchical`` model, its
``hierarchical`` top-down prior and the ``hierarchical_elbo`` objective."""

from __future__ import annotations

from ncpvae import hookimpl
from ncpvae_plugins.hierarchical.model import HierarchicalVAE
from ncpvae_plugins.hierarchical.objective import HierarchicalELBO
from ncpvae_plugins.hierarchical.prior import ModelHierarchicalPrior

__all__ = ["HierarchicalVAE", "HierarchicalELBO", "ModelHierarchicalPrior"]


@hookimpl
def ncpvae_register_models() -> list[type]:
    return [HierarchicalVAE]


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [ModelHierarchicalPrior]


@hookimpl
def ncpvae_register_objectives() -> list[type]:
    return [HierarchicalELBO]
