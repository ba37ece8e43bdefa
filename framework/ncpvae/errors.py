"""User-facing errors.

Every mistake a user can make (a bad config, an unknown plugin name, a missing file, a diverging
sampler) raises :class:`NcpvaeError` or a subclass. The CLI prints such errors as one line on
stderr and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import ValidationError


class NcpvaeError(Exception):
    """An error caused by user input; its message is a complete, one-line explanation."""


class ConfigError(NcpvaeError, ValueError):
    """A config (file, override or keyword arguments) is invalid."""


class PluginError(NcpvaeError):
    """A plugin could not be loaded, or two plugins clash."""


class UnknownComponentError(ConfigError, KeyError):
    """A component name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NotFittedError(NcpvaeError, RuntimeError):
    """A learned component was used before it was fitted or loaded."""


class NonFiniteError(NcpvaeError, FloatingPointError):
    """A loss, energy or position became NaN or infinite."""


class DataError(NcpvaeError, ValueError):
    """Input data is missing, corrupt or of the wrong shape."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def format_validation_error(error: ValidationError, what: str = "config") -> str:
    """One line naming each failing location, e.g. ``invalid config: prior.scale: ...``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("greater_than", "greater_than_equal", "less_than",
                            "less_than_equal", "literal_error", "int_parsing", "float_parsing",
                            "bool_parsing", "string_type", "int_type", "float_type",
                            "finite_number"):
            msg += f" (got {item['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)
