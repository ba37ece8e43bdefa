"""The hooks a plugin implements. Each returns a list of component classes.

A plugin is a module with functions named after these specs and decorated with
``@ncpvae.hookimpl``; it only implements the hooks it needs::

    from ncpvae import hookimpl

    @hookimpl
    def ncpvae_register_priors():
        return [MoGPrior]

Built-in plugins (``ncpvae_plugins.*``) register through exactly the same hooks; which hook
registers which kind is listed once, in :mod:`ncpvae.kinds`.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "ncpvae"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def ncpvae_register_datasets() -> list[type]:
    """Return dataset plugin classes (subclasses of :class:`ncpvae.DatasetPlugin`)."""


@hookspec
def ncpvae_register_models() -> list[type]:
    """Return latent model classes (subclasses of :class:`ncpvae.LatentModel`)."""


@hookspec
def ncpvae_register_priors() -> list[type]:
    """Return prior classes (subclasses of :class:`ncpvae.Prior`)."""


@hookspec
def ncpvae_register_objectives() -> list[type]:
    """Return objective classes (subclasses of :class:`ncpvae.Objective`)."""


@hookspec
def ncpvae_register_samplers() -> list[type]:
    """Return sampler classes (subclasses of :class:`ncpvae.Sampler`)."""


@hookspec
def ncpvae_register_loggers() -> list[type]:
    """Return experiment logger classes (subclasses of :class:`ncpvae.ExperimentLogger`)."""
