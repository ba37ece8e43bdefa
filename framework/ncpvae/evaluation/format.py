"""Number formatting shared by the report, the metric table's detail cells and the printed run
summary (the feature net's accuracy against its targets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ncpvae.metrics.significance import FLAG


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


def accuracy_against_targets(net: Mapping[str, Any], flag: str = FLAG) -> str:
    """The ``feature_net`` block of evaluation.json as one line: held-out accuracy per head,
    each with its target (``flag`` after a head below it), e.g.
    ``"shape 0.659 (target 0.97 ⚠), orientation 0.051, posX 0.991 (target 0.95)"``."""
    targets = net.get("targets") or {}
    below = net.get("below_target") or {}
    parts = []
    for head, acc in (net.get("val_accuracy") or {}).items():
        text = f"{head} {acc:.3f}" if isinstance(acc, (int, float)) else f"{head} —"
        if head in targets:
            text += f" (target {targets[head]:.2f}{' ' + flag if head in below else ''})"
        parts.append(text)
    return ", ".join(parts)


def instrument_status(net: Mapping[str, Any], flag: str = FLAG) -> str:
    """Whether the feature net meets its accuracy targets, in words (with ``flag`` if not)."""
    meets = net.get("meets_target")
    if meets is None:
        return "no accuracy target stated"
    if meets:
        return "meets its accuracy targets"
    return f"{flag} below its accuracy target ({', '.join(net.get('below_target') or {})})"
