"""Building components: by name with keyword settings (:func:`create`), or from an already
validated config section (:func:`build_component`, what the runner and composite components
such as the NCP prior's ``base`` use)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ncpvae.component import BuildContext, Component
from ncpvae.errors import NcpvaeError, PluginError
from ncpvae.plugin_manager import get_registry
from ncpvae.registry import Registry
from ncpvae.sections import validate_component


def create(
    kind: str,
    name: str,
    *,
    latent_dim: int | None = None,
    device: str | Any | None = None,
    dtype: Any = None,
    image_shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    registry: Registry | None = None,
    **config_fields: Any,
) -> Component:
    """Build any registered component by name from its config defaults plus ``config_fields``.

    Validation and error messages are the same as for config files, e.g.
    ``ncpvae.create("prior", "gaussian", latent_dim=8)`` or
    ``ncpvae.create("sampler", "langevin", step_size=0.1, metropolis=True)``.
    """
    registry = registry if registry is not None else get_registry()
    config = validate_component(kind, {"name": name, **config_fields}, registry)
    ctx = BuildContext(
        latent_dim=latent_dim,
        image_shape=image_shape,
        device=torch.device(device) if device is not None else torch.device("cpu"),
        dtype=dtype if dtype is not None else torch.float32,
        seed=seed,
        registry=registry,
    )
    return build_component(config, kind, ctx)


def build_component(config: Any, kind: str, ctx: BuildContext) -> Component:
    """Build a component from an already validated config section (used by the runner and by
    composite components such as the NCP prior's base)."""
    registry = ctx.registry if ctx.registry is not None else get_registry()
    cls = registry.get(kind, config.name)
    with plugin_errors(registry, kind, config.name, "failed to build"):
        component = cls.from_config(config, ctx)
        if isinstance(component, torch.nn.Module):
            component = component.to(device=ctx.device, dtype=ctx.dtype)
    return component


@contextmanager
def plugin_errors(registry: Registry, kind: str, name: str, doing: str) -> Iterator[None]:
    """Turn an unexpected exception of a third-party component into one :class:`PluginError`
    line, e.g. ``prior 'boom' (plugin ncpvae-boom 0.1) failed to build: RuntimeError: ...``.

    ncpvae's own errors (``ConfigError``, ``DataError``, ...) pass through unchanged, and so does
    anything a built-in component raises (that is a bug and keeps its traceback).
    """
    try:
        yield
    except NcpvaeError:
        raise
    except Exception as exc:
        plugin = registry.source(kind, name) if (kind, name) in registry else None
        if plugin is None or registry.is_builtin(plugin):
            raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        raise PluginError(
            f"{kind} '{name}' (plugin {registry.plugin_label(plugin)}) {doing}: {detail}"
        ) from exc
