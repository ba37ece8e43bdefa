"""ncpvae: a PyTorch plugin framework for VAE latent priors and latent samplers.

Public API::

    from ncpvae import hookimpl, Prior, Sampler, Objective, LatentModel, ComponentConfig
    prior = ncpvae.create("prior", "gaussian", latent_dim=8)
"""

from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.data import DataBundle, DatasetPlugin, GroundTruthData, ImageSource, TensorImageSource
from ncpvae.errors import NcpvaeError
from ncpvae.hookspecs import hookimpl
from ncpvae.model import LatentModel
from ncpvae.objective import Objective
from ncpvae.prior import Prior
from ncpvae.sampler import Sampler, SampleResult

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazily import the heavier entry points so `import ncpvae` stays cheap for plugin authors.
    if name in ("create", "get_registry"):
        from ncpvae import plugin_manager

        return getattr(plugin_manager, name)
    raise AttributeError(f"module 'ncpvae' has no attribute {name!r}")


__all__ = [
    "BuildContext",
    "ComponentConfig",
    "DataBundle",
    "DatasetPlugin",
    "GroundTruthData",
    "ImageSource",
    "LatentModel",
    "NcpvaeError",
    "Objective",
    "Prior",
    "SampleResult",
    "Sampler",
    "TensorImageSource",
    "create",
    "get_registry",
    "hookimpl",
]
