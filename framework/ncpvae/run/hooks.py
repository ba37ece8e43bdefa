"""Boundary callbacks: the points of a run at which code outside the run may act.

The runner calls :func:`boundary` with a label right after each point from which
``ncpvae resume`` continues, and once in the middle of two stages:

- ``"epoch"``: after the checkpoint of an epoch of VAE training;
- ``"fit"``: in the fit stage, after the fit and before its outputs are written;
- ``"evaluate"``: in the evaluation, after the prior x sampler table;
- ``"stage"``: after a completed stage's summary and checkpoint.

Nothing is installed by default, so a boundary costs nothing. Tests install a callback with
:func:`boundary_callback` to kill the process there (``tests/helpers/kill_at.py``: SIGKILL at
the n-th boundary, then ``ncpvae resume`` must end with the numbers of a run never
interrupted); a benchmark copies the run directory after chosen epochs. A callback gets the
label and runs in the process that reaches the boundary (every rank under torchrun).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``callback(label)``, called at every boundary while installed
BoundaryCallback = Callable[[str], None]

_callbacks: list[BoundaryCallback] = []


@contextmanager
def boundary_callback(callback: BoundaryCallback) -> Iterator[BoundaryCallback]:
    """Call ``callback(label)`` at every boundary reached inside the ``with`` block."""
    _callbacks.append(callback)
    try:
        yield callback
    finally:
        _callbacks.remove(callback)


def boundary(label: str) -> None:
    """Mark the boundary ``label`` (see the module docstring): call each installed callback, in
    the order they were installed."""
    for callback in tuple(_callbacks):
        callback(label)


__all__ = ["BoundaryCallback", "boundary", "boundary_callback"]
