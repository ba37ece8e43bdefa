"""When a paired difference is flagged: a learned prior more than ``FLAG_SE`` standard errors
below what it should improve on (N(0, I), or its learned base), shown as a visible flag by the
compare-priors table, the report and the run summary (docs/metrics.md §6)."""

from __future__ import annotations

import math
from typing import Any

#: how many SEs below zero a paired gain must be for its row to be flagged
FLAG_SE = 2.0
#: the mark a flagged number carries in tables and summaries
FLAG = "⚠"


def significantly_below(mean: Any, se: Any, k: float = FLAG_SE) -> bool:
    """Whether ``mean < -k * se`` for a finite ``mean`` and a finite ``se >= 0`` (plain numbers;
    None or a non-finite value: False, nothing to flag)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, se)):
        return False
    return se >= 0 and mean < -k * se


def gain_flags(row: dict[str, Any]) -> list[str]:
    """The flags of one compare-priors row (plain data): ``"below N(0, I)"`` when its ``gain``
    is more than ``FLAG_SE`` SEs below 0, ``"below its base"`` likewise for ``gain_over_base``
    (a prior over a learned base, e.g. ``ncp:gmm``)."""
    flags = []
    if significantly_below(row.get("gain"), row.get("gain_se")):
        flags.append("below N(0, I)")
    if significantly_below(row.get("gain_over_base"), row.get("gain_over_base_se")):
        flags.append("below its base")
    return flags


def flag_text(flags: list[str]) -> str:
    """``"⚠ below N(0, I), below its base (> 2 SE)"`` (empty without flags)."""
    return f"{FLAG} {', '.join(flags)} (> {FLAG_SE:g} SE)" if flags else ""


def _pm(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f} ± {row[key + '_se']:.3f}"


def flag_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per flagged compare-priors row, naming the prior, the gain and its SE."""
    notes = []
    for row in rows:
        parts = []
        if significantly_below(row.get("gain"), row.get("gain_se")):
            parts.append(f"gain over N(0, I) {_pm(row, 'gain')} nats")
        if significantly_below(row.get("gain_over_base"), row.get("gain_over_base_se")):
            parts.append(f"gain over its base {_pm(row, 'gain_over_base')} nats")
        if parts:
            notes.append(f"{FLAG} {row.get('label')} ({row.get('prior')}): "
                         f"{' and '.join(parts)}: more than {FLAG_SE:g} SE below 0, worse than "
                         "the prior it should improve on")
    return notes
