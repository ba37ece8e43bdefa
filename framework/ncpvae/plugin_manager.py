"""Loading plugins and building the component registry.

Built-in plugins (``ncpvae_plugins.*``) and third-party plugins (entry-point group ``ncpvae``)
register through the same hooks (see :mod:`ncpvae.hookspecs`). Each third-party plugin is loaded
on its own: one that fails to import, or whose ``ncpvae_register_*`` hook raises, becomes a
warning naming it and its error (an error when ``strict``), and everything else keeps working.
A hook that returns something other than a list of component classes, and two plugins
registering the same name, stay errors: those are contract violations, not runtime failures.

Environment switches: ``NCPVAE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points;
``NCPVAE_DISABLE_PLUGINS=a,b`` skips the named plugins (entry-point names, or built-in module
names such as ``ncpvae_plugins.sgld``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from ncpvae import hookspecs
from ncpvae.errors import PluginError
from ncpvae.kinds import COMPONENT_KINDS
from ncpvae.registry import Registry

ENTRY_POINT_GROUP = "ncpvae"

#: Modules of the plugins that ship with ncpvae; the only place the framework names them.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "ncpvae_plugins.datasets",
    "ncpvae_plugins.models",
    "ncpvae_plugins.gaussian",
    "ncpvae_plugins.beta_elbo",
    "ncpvae_plugins.ncp",
    "ncpvae_plugins.langevin",
    "ncpvae_plugins.sgld",
    "ncpvae_plugins.sir",
    "ncpvae_plugins.gmm",
    "ncpvae_plugins.flow",
    "ncpvae_plugins.ebm",
    "ncpvae_plugins.vamp",
    "ncpvae_plugins.loggers",
    "ncpvae_plugins.diffusion",
    "ncpvae_plugins.two_stage",
    "ncpvae_plugins.made",
    "ncpvae_plugins.hierarchical",
)


class PluginLoadWarning(UserWarning):
    """A third-party plugin failed to load (or one of its hooks raised) and was skipped."""


@dataclass
class PluginInfo:
    """One loaded plugin: its name, where it came from, its version and what it registered."""

    name: str
    source: str  # "builtin", "entrypoint" or "manual"
    version: str
    components: list[tuple[str, str]] = field(default_factory=list)


def _disabled_names() -> set[str]:
    raw = os.environ.get("NCPVAE_DISABLE_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


class PluginManager:
    """Loads plugins into a pluggy manager and builds a :class:`Registry` from their hooks.

    ``plugins`` are extra plugin objects (modules or instances with ``@hookimpl`` functions),
    registered as ``manual``; tests pass throw-away plugins this way with ``entrypoints=False``.
    """

    def __init__(
        self,
        *,
        builtins: bool = True,
        entrypoints: bool | None = None,
        plugins: Iterable[Any] = (),
        strict: bool = False,
    ):
        self.strict = strict
        self.failures: list[str] = []
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        disabled = _disabled_names()
        if entrypoints is None:
            entrypoints = os.environ.get("NCPVAE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        # External plugins first, then built-ins (tox's order); duplicates are errors either way.
        if entrypoints:
            self._load_entrypoints(disabled)
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                if module_name in disabled or module_name.rsplit(".", 1)[-1] in disabled:
                    continue
                self._register(importlib.import_module(module_name), module_name, "builtin",
                               _distribution_version("ncpvae"))
        for index, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"manual-{index}"
            self._register(plugin, name, "manual", getattr(plugin, "__version__", "-"))
        self._pm.check_pending()
        self.registry = self._build_registry()

    def _load_entrypoints(self, disabled: set[str]) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or self._pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import-time failure of a third-party plugin
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
                message = f"plugin '{ep.name}' ({ep.value}) failed to load and was skipped: {detail}"
                if self.strict:
                    raise PluginError(message) from exc
                self.failures.append(message)
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
                continue
            version = ep.dist.version if ep.dist is not None else "-"
            self._register(module, ep.name, "entrypoint", version)

    def _register(self, plugin: Any, name: str, source: str, version: str) -> None:
        self._pm.register(plugin, name=name)
        self._info[name] = PluginInfo(name=name, source=source, version=version)

    def _build_registry(self) -> Registry:
        registry = Registry()
        registry.plugin_meta.update({info.name: (info.source, info.version)
                                     for info in self._info.values()})
        for component_kind in COMPONENT_KINDS:
            hook_name, kind, base = component_kind.hook, component_kind.name, component_kind.base
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                try:
                    classes = impl.function()
                except Exception as exc:  # a third-party hook must not take down the others
                    if self._info[impl.plugin_name].source == "builtin":
                        raise  # a bug in ncpvae itself: keep the traceback
                    self._hook_failed(impl.plugin_name, hook_name, exc)
                    continue
                if not isinstance(classes, (list, tuple)):
                    raise PluginError(
                        f"plugin '{impl.plugin_name}': {hook_name}() must return a list of "
                        f"classes, got {type(classes).__name__}"
                    )
                for cls in classes:
                    if not (isinstance(cls, type) and issubclass(cls, base)):
                        raise PluginError(
                            f"plugin '{impl.plugin_name}': {hook_name}() returned {cls!r}, "
                            f"which is not a subclass of {base.__name__}"
                        )
                    registry.register(kind, cls, impl.plugin_name)
                    self._info[impl.plugin_name].components.append((kind, cls.name))
        return registry

    def _hook_failed(self, plugin: str, hook_name: str, exc: Exception) -> None:
        """A plugin's hook raised: a warning naming it (an error when ``strict``)."""
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        message = (f"plugin '{plugin}' failed in {hook_name}() and its components there were "
                   f"skipped: {detail}")
        if self.strict:
            raise PluginError(message) from exc
        self.failures.append(message)
        warnings.warn(message, PluginLoadWarning, stacklevel=3)

    @property
    def plugins(self) -> list[PluginInfo]:
        """Loaded plugins, in load order."""
        return list(self._info.values())


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


@lru_cache(maxsize=2)
def get_plugin_manager(strict: bool = False) -> PluginManager:
    """The process-wide plugin manager (built-ins plus entry points), built once."""
    return PluginManager(strict=strict)


def get_registry(strict: bool = False) -> Registry:
    """The process-wide component registry."""
    return get_plugin_manager(strict).registry


__all__ = ["PluginManager", "PluginInfo", "PluginLoadWarning", "get_plugin_manager", "get_registry"]
