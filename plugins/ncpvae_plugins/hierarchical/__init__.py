"""Hierarchical VAE plugins (docs/hierarchical.md): the ``hierarchical`` model, its
``hierarchical`` top-down prior, the ``hier_ncp`` learned prior and the ``hierarchical_elbo``
objective, and the ``groupwise_langevin`` and ``groupwise_sir`` samplers."""

from __future__ import annotations

from ncpvae import hookimpl
from ncpvae_plugins.hierarchical.model import HierarchicalVAE
from ncpvae_plugins.hierarchical.ncp import HierarchicalNCPPrior
from ncpvae_plugins.hierarchical.objective import HierarchicalELBO
from ncpvae_plugins.hierarchical.prior import ModelHierarchicalPrior
from ncpvae_plugins.hierarchical.samplers import GroupwiseLangevinSampler, GroupwiseSIRSampler

__all__ = ["GroupwiseLangevinSampler", "GroupwiseSIRSampler", "HierarchicalELBO",
           "HierarchicalNCPPrior", "HierarchicalVAE", "ModelHierarchicalPrior"]


@hookimpl
def ncpvae_register_models() -> list[type]:
    return [HierarchicalVAE]


@hookimpl
def ncpvae_register_priors() -> list[type]:
    return [ModelHierarchicalPrior, HierarchicalNCPPrior]


@hookimpl
def ncpvae_register_objectives() -> list[type]:
    return [HierarchicalELBO]


@hookimpl
def ncpvae_register_samplers() -> list[type]:
    return [GroupwiseLangevinSampler, GroupwiseSIRSampler]
