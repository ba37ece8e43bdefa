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
from ncpvae.hookspecs import hookimpl
from ncpvae.model import LatentModel, reparameterize
from ncpvae.objective import Objective
from ncpvae.plugin_manager import get_registry
from ncpvae.prior import LearnedPrior, Prior
from ncpvae.sampler import Sampler, SampleResult
from ncpvae.sections import (
    DatasetSection,
    ModelSection,
    ObjectiveSection,
    PriorSection,
    SamplerSection,
    component_section,
)

__version__ = "0.1.0"


__all__ = [
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
    "component_section",
    "BuildContext",
    "ComponentConfig",
    "DataBundle",
    "DatasetPlugin",
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
    "build_component",
    "create",
    "get_registry",
    "hookimpl",
    "reparameterize",
]
