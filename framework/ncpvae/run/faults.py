"""Deterministic kill points for fault-injection tests (off unless an environment variable asks).

The runner calls :func:`boundary` right after each checkpoint it writes, at each stage
boundary and once in the middle of the evaluation (``evaluate``). With ``NCPVAE_KILL_AFTER=n``
the process kills itself with ``SIGKILL`` (no cleanup, no ``finally``, exactly like ``kill -9``
or a preempted job) at the n-th boundary (1-based);
``NCPVAE_KILL_AFTER=n@label`` counts only the boundaries named ``label`` (e.g. ``3@epoch``).
``NCPVAE_KILL_LOG=path`` appends the label of every boundary reached to ``path`` (one per line),
so a test can list the kill points of a run before choosing them.
"""

from __future__ import annotations

import os
import signal

ENV_KILL_AFTER = "NCPVAE_KILL_AFTER"
ENV_KILL_LOG = "NCPVAE_KILL_LOG"

_counts: dict[str | None, int] = {}


def _target() -> tuple[int, str | None] | None:
    raw = os.environ.get(ENV_KILL_AFTER, "").strip()
    if not raw:
        return None
    number, _, label = raw.partition("@")
    return int(number), (label or None)


def boundary(label: str) -> None:
    """Mark a checkpoint/stage boundary named ``label``; maybe die here (see module doc)."""
    log = os.environ.get(ENV_KILL_LOG)
    if log:
        with open(log, "a") as handle:
            handle.write(label + "\n")
    target = _target()
    if target is None:
        return
    number, only = target
    if only is not None and only != label:
        return
    _counts[only] = _counts.get(only, 0) + 1
    if _counts[only] == number:
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the boundaries counted so far (for in-process tests)."""
    _counts.clear()


__all__ = ["ENV_KILL_AFTER", "ENV_KILL_LOG", "boundary", "reset"]
