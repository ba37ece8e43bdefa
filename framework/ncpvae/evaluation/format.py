"""Number formatting shared by the report and the metric table's detail cells."""

from __future__ import annotations

from typing import Any


def num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; None/missing as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits - 1, 1)}f}"
    return str(value)


def pm(mean: Any, se: Any, digits: int = 3) -> str:
    """``mean ± se``."""
    if mean is None:
        return "—"
    return f"{num(mean, digits)} ± {num(se, 2)}" if se is not None else num(mean, digits)
