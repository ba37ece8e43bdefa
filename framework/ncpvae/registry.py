"""The component registry: kind -> name -> class, remembering which plugin supplied each class."""

from __future__ import annotations

from dataclasses import dataclass, field

from ncpvae.errors import PluginError, UnknownComponentError, did_you_mean
from ncpvae.kinds import KINDS


@dataclass
class Registry:
    """Maps ``(kind, name)`` to a component class and the plugin that registered it."""

    _classes: dict[str, dict[str, type]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    _sources: dict[tuple[str, str], str] = field(default_factory=dict)
    #: plugin name -> (source: "builtin", "entrypoint" or "manual", version), set by the manager
    plugin_meta: dict[str, tuple[str, str]] = field(default_factory=dict)

    def register(self, kind: str, cls: type, plugin: str) -> None:
        """Add ``cls`` under ``(kind, cls.name)``; a second class for the same key is an error."""
        self._check_kind(kind)
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin '{plugin}' registered {cls!r} as a {kind} without a `name` class attribute"
            )
        if getattr(cls, "kind", kind) != kind:
            raise PluginError(
                f"plugin '{plugin}' registered {kind} '{name}', but the class is a {cls.kind}"
            )
        previous = self._sources.get((kind, name))
        if previous is not None:
            raise PluginError(
                f"{kind} '{name}' is registered twice: by plugin '{previous}' and by plugin "
                f"'{plugin}'; disable one (NCPVAE_DISABLE_PLUGINS={plugin})"
            )
        self._classes[kind][name] = cls
        self._sources[(kind, name)] = plugin

    def get(self, kind: str, name: str) -> type:
        """Return the class registered as ``(kind, name)``, or raise a listing error."""
        self._check_kind(kind)
        try:
            return self._classes[kind][name]
        except KeyError:
            available = ", ".join(sorted(self._classes[kind])) or "none"
            raise UnknownComponentError(
                f"unknown {kind} '{name}'{did_you_mean(name, self._classes[kind])}; "
                f"available: {available}"
            ) from None

    def names(self, kind: str) -> list[str]:
        """Sorted names registered under ``kind``."""
        self._check_kind(kind)
        return sorted(self._classes[kind])

    def source(self, kind: str, name: str) -> str:
        """The plugin that registered ``(kind, name)``."""
        self.get(kind, name)
        return self._sources[(kind, name)]

    def plugin_label(self, plugin: str) -> str:
        """``"<plugin> <version>"`` (just the name when the version is unknown)."""
        _, version = self.plugin_meta.get(plugin, ("manual", "-"))
        return plugin if version in ("", "-") else f"{plugin} {version}"

    def is_builtin(self, plugin: str) -> bool:
        """Whether ``plugin`` ships with ncpvae."""
        return self.plugin_meta.get(plugin, ("manual", "-"))[0] == "builtin"

    def items(self) -> list[tuple[str, str, type, str]]:
        """All ``(kind, name, class, plugin)`` rows, grouped by kind."""
        return [
            (kind, name, self._classes[kind][name], self._sources[(kind, name)])
            for kind in KINDS
            for name in sorted(self._classes[kind])
        ]

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._classes.get(kind, {})

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(
                f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; "
                f"kinds: {', '.join(KINDS)}"
            )
