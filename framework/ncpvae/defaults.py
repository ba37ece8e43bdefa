"""Defaults that name built-in plugins, read from the shipped ``ncpvae/configs/defaults.toml``.

Which dataset, model, prior and objective a run uses when its config omits them, the
evaluation's sampler rows, the priors ``ncpvae compare-priors`` compares: these are data, so
they live in a shipped config file beside ``default.toml`` and ``smoke.toml``, not in code.
The config models take their field defaults from here (:func:`shipped_default`), so a user
config that omits a section resolves exactly as before.
"""

from __future__ import annotations

import copy
import functools
import sys
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the `tomli` package (a declared dependency there)
    import tomli as tomllib

__all__ = ["DEFAULTS_FILE", "shipped_default", "tomllib"]

#: the file in ``ncpvae/configs`` that holds the defaults (not a run config itself)
DEFAULTS_FILE = "defaults.toml"


@functools.cache
def _defaults() -> dict[str, Any]:
    return tomllib.loads(resources.files("ncpvae.configs").joinpath(DEFAULTS_FILE).read_text())


def shipped_default(*keys: str) -> Any:
    """The value at ``keys`` of the shipped defaults (a fresh copy: callers may mutate it),
    e.g. ``shipped_default("run", "prior") == {"name": "gaussian"}``."""
    value: Any = _defaults()
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"{DEFAULTS_FILE} has no '{'.'.join(keys[:depth + 1])}'")
        value = value[key]
    return copy.deepcopy(value)
