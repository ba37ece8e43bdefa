"""ncpvae: a PyTorch plugin framework for VAE latent priors and latent samplers.

The top level is what a plugin author needs (a test keeps the built-in plugins to it)::

    from ncpvae import hookimpl, Prior, Sampler, Objective, LatentModel, ComponentConfig
    prior = ncpvae.create("prior", "gaussian", latent_dim=8)

Further public namespaces, each with its own ``__all__``: :mod:`ncpvae.mcmc` (sampler building
blocks: energies and gradients, Langevin moves, the divergence policy, importance resampling,
ESS / R-hat), :mod:`ncpvae.mcmc.fastpath` (compiled energies), :mod:`ncpvae.testing` (conformance
checks for a plugin's components), :mod:`ncpvae.tilted` (a tilted prior over a base),
:mod:`ncpvae.splits` (dataset split helpers), :mod:`ncpvae.modes` (``eval_mode``) and
:mod:`ncpvae.hierarchical` (hierarchical priors and hierarchical NCP).

The notebook API is here too: ``run = ncpvae.open_run(path)`` (a run directory or an
``ncpvae export`` folder) and ``run = ncpvae.train("smoke")`` give a :class:`ncpvae.api.TrainedRun`
(``run.encode``, ``run.decode``, ``run.sample``, ``run.summary``, ...).

``import ncpvae`` loads the core only (interfaces, registry, components, MCMC building blocks):
no run config, runner, evaluation or metric module; ``open_run`` and ``train`` load
:mod:`ncpvae.api` (and with it the runner) on first use.
"""

from typing import TYPE_CHECKING, Any

from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.data import DataBundle, DatasetPlugin, GroundTruthData, ImageSource, TensorImageSource
from ncpvae.errors import (
    ConfigError,
    DataError,
    NcpvaeError,
    NonFiniteError,
    NotFittedError,
    PluginError,
)
from ncpvae.factory import build_component, create
from ncpvae.fitting import EarlyStopping, EpochLosses, ShardGroup, minibatch_step
from ncpvae.hookspecs import hookimpl
from ncpvae.io import atomic_write
from ncpvae.logging_backends import ExperimentLogger
from ncpvae.model import LatentModel, reparameterize
from ncpvae.objective import Objective
from ncpvae.plugin_manager import get_registry
from ncpvae.prior import FitOptions, LearnedPrior, Prior
from ncpvae.sampler import MarkovChainConfig, Sampler, SampleResult
from ncpvae.sections import PriorSection, SamplerSection, component_section
from ncpvae.sharding import global_batch_mean, randint_rows

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ncpvae.api import open_run, train

#: the notebook API (:mod:`ncpvae.api`), imported on first use: ``import ncpvae`` stays core only
_LAZY = ("open_run", "train")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ncpvae import api

        return getattr(api, name)
    raise AttributeError(f"module 'ncpvae' has no attribute {name!r}")


__all__ = [
    # components: registration, config, building
    "hookimpl",
    "ComponentConfig",
    "BuildContext",
    "PriorSection",
    "SamplerSection",
    "component_section",
    "create",
    "build_component",
    "get_registry",
    # the interfaces a plugin implements
    "Prior",
    "LearnedPrior",
    "FitOptions",
    "Sampler",
    "MarkovChainConfig",
    "SampleResult",
    "Objective",
    "LatentModel",
    "reparameterize",
    "DatasetPlugin",
    "DataBundle",
    "ImageSource",
    "TensorImageSource",
    "GroundTruthData",
    "ExperimentLogger",
    # errors
    "NcpvaeError",
    "ConfigError",
    "DataError",
    "PluginError",
    "NonFiniteError",
    "NotFittedError",
    # learned-prior fitting blocks; batch terms and per-chain draws exact under torchrun
    "EarlyStopping",
    "EpochLosses",
    "minibatch_step",
    "ShardGroup",
    "global_batch_mean",
    "randint_rows",
    "atomic_write",
    # the notebook API: a trained run to encode, decode and sample (loaded on first use)
    "open_run",
    "train",
]
