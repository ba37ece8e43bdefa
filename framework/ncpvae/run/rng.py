"""Every random-number state a run draws from, as plain data a checkpoint can hold.

:func:`capture` returns a dict of tensors, ints, floats and strings only (so the checkpoint still
loads with ``torch.load(weights_only=True)``); :func:`restore` puts it back. Captured are:

- ``torch_cpu``: the global CPU generator (``torch.get_rng_state()``, ``(5056,)`` uint8);
- ``torch_cuda``: one state per CUDA device (``torch.cuda.get_rng_state_all()``), if CUDA is
  initialised; restoring on a machine with fewer devices is an error;
- ``numpy``: the legacy global ``numpy.random`` state (MT19937 key ``(624,)`` uint32 as int64,
  position, gaussian cache);
- ``python``: the ``random`` module's state (``(625,)`` int64 plus the gaussian cache);
- ``generators``: named ``torch.Generator`` objects of the run (e.g. the data-order generator),
  each ``get_state()``.

After ``restore(capture(...))`` every later draw is bit-identical to what it would have been.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ncpvae.errors import DataError

FORMAT = 1


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _numpy_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def capture(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of the global torch (CPU and CUDA), numpy and Python states and ``generators``."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "torch_cpu": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None,
            *, what: str = "checkpoint") -> None:
    """Put back what :func:`capture` saved; ``generators`` are set in place, by name."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise DataError(f"{what}: no random-number state of a known format; the checkpoint "
                        "was written by another ncpvae version, start the run again")
    torch.set_rng_state(state["torch_cpu"])
    cuda = state.get("torch_cuda")
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda):
            raise DataError(f"{what} was written on {len(cuda)} CUDA device(s) that this machine "
                            "does not have; resume it where it ran")
        torch.cuda.set_rng_state_all(cuda)
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise DataError(f"{what} holds no state of the '{name}' generator; start the run again")
        gen.set_state(saved[name])


__all__ = ["capture", "restore"]
