"""The one table of component kinds: name, the hook that registers them, their base class.

The registry, the hook specs, the plugin manager and the config sections all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ncpvae.data import DatasetPlugin
from ncpvae.logging_backends import ExperimentLogger
from ncpvae.model import LatentModel
from ncpvae.objective import Objective
from ncpvae.prior import Prior
from ncpvae.sampler import Sampler


@dataclass(frozen=True)
class ComponentKind:
    """``name`` as configs and the CLI spell it; ``hook`` returns its classes; ``base`` is the
    interface every registered class must subclass."""

    name: str
    hook: str
    base: type


#: In the order configs and listings show them.
COMPONENT_KINDS: tuple[ComponentKind, ...] = (
    ComponentKind("dataset", "ncpvae_register_datasets", DatasetPlugin),
    ComponentKind("model", "ncpvae_register_models", LatentModel),
    ComponentKind("prior", "ncpvae_register_priors", Prior),
    ComponentKind("objective", "ncpvae_register_objectives", Objective),
    ComponentKind("sampler", "ncpvae_register_samplers", Sampler),
    ComponentKind("logger", "ncpvae_register_loggers", ExperimentLogger),
)

KINDS: tuple[str, ...] = tuple(kind.name for kind in COMPONENT_KINDS)
