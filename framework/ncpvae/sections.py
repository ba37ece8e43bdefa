"""Config fields that hold a component's config (``[prior]``, ``[prior.base]``, a sampler table).

The ``name`` key picks the plugin from the registry passed as validation context (the default
registry when none is passed); the plugin's own ``Config`` class validates the rest. Composite
components (the NCP prior's ``base``) and the evaluation's sampler list use the same field type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, SerializeAsAny, ValidationError, ValidationInfo

from ncpvae.component import ComponentConfig
from ncpvae.errors import ConfigError, format_validation_error
from ncpvae.plugin_manager import get_registry
from ncpvae.registry import Registry


def registry_from(info: ValidationInfo | None) -> Registry:
    context = info.context if info is not None else None
    if isinstance(context, Mapping) and context.get("registry") is not None:
        return context["registry"]
    return get_registry()


def _component_validator(kind: str):
    def validate(data: Any, info: ValidationInfo) -> ComponentConfig:
        registry = registry_from(info)
        if isinstance(data, ComponentConfig):
            data = data.model_dump()
        if isinstance(data, str):  # a bare name selects that plugin with its defaults
            data = {"name": data}
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a {kind} name or a table with a 'name' key")
        if "name" not in data:
            raise ValueError(
                f"missing 'name'; available {kind}s: {', '.join(registry.names(kind)) or 'none'}"
            )
        cls = registry.get(kind, str(data["name"]))
        return cls.Config.model_validate(dict(data), context=info.context)

    return validate


def component_section(kind: str) -> Any:
    """The annotated type of a config field holding a ``kind`` component's config."""
    return Annotated[SerializeAsAny[ComponentConfig], BeforeValidator(_component_validator(kind))]


DatasetSection = component_section("dataset")
ModelSection = component_section("model")
PriorSection = component_section("prior")
ObjectiveSection = component_section("objective")
SamplerSection = component_section("sampler")
LoggerSection = component_section("logger")


def validate_component(kind: str, raw: Mapping[str, Any],
                       registry: Registry | None = None) -> ComponentConfig:
    """Validate one component's config (what ``ncpvae.create`` does); raise
    :class:`~ncpvae.errors.ConfigError` with a one-line message."""
    registry = registry if registry is not None else registry_from(None)
    cls = registry.get(kind, str(raw.get("name")))
    try:
        return cls.Config.model_validate(dict(raw), context={"registry": registry})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{kind} '{cls.name}' config")) from None
