"""What every plugin component shares: a pydantic config class and a build context.

A component class (prior, sampler, objective, model or dataset) declares::

    class MyPrior(Prior):
        name = "mine"                      # the name configs use
        class Config(ComponentConfig):     # its validated settings
            name: Literal["mine"] = "mine"
            scale: float = Field(1.0, gt=0)

        @classmethod
        def from_config(cls, config, ctx):  # build it
            return cls(ctx.latent_dim, scale=config.scale)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ncpvae.errors import did_you_mean

if TYPE_CHECKING:
    from ncpvae.registry import Registry


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys with a close-match suggestion, and NaN or
    infinite floats (a learning rate, beta or step size of ``inf`` would only fail later as a
    non-finite loss; no setting of ncpvae needs an infinite value)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            errors = [
                InitErrorDetails(
                    type=PydanticCustomError(
                        "unknown_key", "unknown key '{key}'{hint}; valid keys: {valid}",
                        {"key": str(key), "hint": did_you_mean(str(key), known),
                         "valid": ", ".join(sorted(known))}),
                    loc=(key,), input=value)
                for key, value in data.items() if key not in known
            ]
            if errors:  # raised as a ValidationError so each location names the bad key
                raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


class ComponentConfig(StrictModel):
    """Base of every component's config. Subclasses narrow ``name`` to ``Literal["their-name"]``."""

    name: str


@dataclass
class BuildContext:
    """What a component may need from the run that builds it.

    ``latent_dim`` is D for priors and models; ``image_shape`` is (C, H, W) for models;
    ``registry`` lets composite components (e.g. the NCP prior's base) build their parts.
    """

    latent_dim: int | None = None
    image_shape: tuple[int, int, int] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    registry: Registry | None = None

    def require_latent_dim(self, who: str) -> int:
        if self.latent_dim is None:
            raise ValueError(f"{who} needs latent_dim; pass latent_dim=... to create()")
        return self.latent_dim


class Component:
    """Mixin giving a component class its registry identity and config contract."""

    kind: ClassVar[str]
    name: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    @classmethod
    def from_config(cls, config: ComponentConfig, ctx: BuildContext) -> Component:
        """Build an instance from its validated ``config`` and the run's ``ctx``."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """Class-level capability flags shown by ``ncpvae describe``."""
        return {}
