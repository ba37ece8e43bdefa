"""ncpvae: a PyTorch plugin framework for VAE latent priors and latent samplers.

Public API::

    from ncpvae import hookimpl, Prior, Sampler, Objective, LatentModel, ComponentConfig
    prior = ncpvae.create("prior", "gaussian", latent_dim=8)
"""

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
from ncpvae.mcmc.diagnostics import acceptance_summary, ess, mcse_mean, split_rhat, summarize
from ncpvae.mcmc.fastpath import CompiledEnergy, onednn_available, onednn_linear
from ncpvae.mcmc.importance import (
    SIRDraws,
    ess_fraction,
    importance_resample,
    sampling_importance_resampling,
)
from ncpvae.mcmc.kernels import (
    DivergenceLog,
    Energy,
    LangevinConstants,
    OnNonfinite,
    adapt_log_step,
    apply_divergence_policy,
    check_generator,
    check_positions,
    deferred_divergence,
    energy_and_grad,
    evaluate_energy,
    finite_rows,
    initial_energy_and_grad,
    langevin_constants,
    langevin_log_accept,
    langevin_move,
    select_rows,
)
from ncpvae.mcmc.targets import posterior_energy
from ncpvae.model import LatentModel, reparameterize
from ncpvae.objective import Objective
from ncpvae.optim import adam
from ncpvae.plugin_manager import get_registry
from ncpvae.prior import FitOptions, LearnedPrior, Prior, check_encodings
from ncpvae.sampler import Callback, MarkovChainConfig, Sampler, SampleResult
from ncpvae.sections import (
    DatasetSection,
    ModelSection,
    ObjectiveSection,
    PriorSection,
    SamplerSection,
    component_section,
)
from ncpvae.sharding import global_batch_mean, randint_rows
from ncpvae.units import bits_per_dim

__version__ = "0.1.0"


__all__ = [
    "adam",
    "ConfigError",
    "DataError",
    "DatasetSection",
    "ModelSection",
    "NonFiniteError",
    "NotFittedError",
    "ObjectiveSection",
    "PluginError",
    "PriorSection",
    "SamplerSection",
    "ShardGroup",
    "component_section",
    "BuildContext",
    "ComponentConfig",
    "DataBundle",
    "DatasetPlugin",
    "EarlyStopping",
    "EpochLosses",
    "FitOptions",
    "GroundTruthData",
    "ImageSource",
    "LatentModel",
    "LearnedPrior",
    "NcpvaeError",
    "Objective",
    "Prior",
    "SampleResult",
    "Sampler",
    "TensorImageSource",
    "atomic_write",
    "build_component",
    "check_encodings",
    "minibatch_step",
    "create",
    "get_registry",
    "hookimpl",
    "reparameterize",
    # batch-level terms and per-chain draws that stay exact under torchrun (ncpvae.sharding)
    "global_batch_mean",
    "randint_rows",
    "bits_per_dim",
    # MCMC building blocks for sampler authors (ncpvae.mcmc)
    "Callback",
    "DivergenceLog",
    "Energy",
    "MarkovChainConfig",
    "OnNonfinite",
    "SIRDraws",
    "acceptance_summary",
    "adapt_log_step",
    "apply_divergence_policy",
    "check_generator",
    "check_positions",
    "deferred_divergence",
    "energy_and_grad",
    "ess",
    "ess_fraction",
    "evaluate_energy",
    "finite_rows",
    "importance_resample",
    "initial_energy_and_grad",
    "LangevinConstants",
    "langevin_constants",
    "langevin_log_accept",
    "langevin_move",
    "mcse_mean",
    "CompiledEnergy",
    "onednn_available",
    "onednn_linear",
    "posterior_energy",
    "sampling_importance_resampling",
    "select_rows",
    "split_rhat",
    "summarize",
]
