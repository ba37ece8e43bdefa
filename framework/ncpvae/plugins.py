"""Deprecated alias: the built-in plugins moved to the ``ncpvae_plugins`` package.

``import ncpvae.plugins.ncp`` keeps working for one release (0.2 removes it): importing this
module warns once and registers every ``ncpvae_plugins`` module under its old name as well, so
``ncpvae.plugins.ncp is ncpvae_plugins.ncp``. Nothing else in ncpvae imports it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

import ncpvae_plugins

warnings.warn(
    "ncpvae.plugins is deprecated: import ncpvae_plugins instead (removed in ncpvae 0.2)",
    DeprecationWarning,
    stacklevel=2,
)

__path__: list[str] = []  # a package for the import system; its submodules are the aliases below

for _info in pkgutil.walk_packages(ncpvae_plugins.__path__, prefix="ncpvae_plugins."):
    _module = importlib.import_module(_info.name)
    _alias = "ncpvae.plugins." + _info.name.removeprefix("ncpvae_plugins.")
    sys.modules.setdefault(_alias, _module)
    if _alias.count(".") == 2:  # a top-level plugin module: also an attribute of this package
        globals()[_alias.rpartition(".")[2]] = _module
