"""The checkpoint format: one writer and one reader of ``checkpoint.pt``.

A checkpoint is a dict of state dicts and plain data only, so it loads with
``torch.load(weights_only=True)``::

    {"format": 1, "stage": "vae" | "prior_fitted", "model": state dict, "prior": state dict,
     ... what the writing stage adds (``epoch``, ``step``, ``optimizer`` after VAE training)}

Written atomically (:func:`ncpvae.io.save_torch`): a crash keeps the previous good checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ncpvae.errors import DataError
from ncpvae.io import load_torch, save_torch
from ncpvae.prior import Prior

#: version of the checkpoint layout
CHECKPOINT_FORMAT = 1


class CheckpointWriter:
    """The writer of one run's ``checkpoint.pt`` within a process.

    It remembers what it last wrote beside the weights (or the state a resumed run read,
    :attr:`last`), so a later write with ``keep_previous`` keeps what an earlier stage stored
    (VAE training's epoch, step and optimizer state) without reading the file back; only a
    writer that has seen no state yet reads the file (e.g. ``ncpvae fit-prior`` on a finished
    run). What it remembers is a CPU copy, as a read-back would give: later in-place updates
    of the live tensors (a fit changing the prior) do not reach it."""

    def __init__(self, path: Path, last: dict[str, Any] | None = None) -> None:
        self.path = path
        #: the state last written or read (None: none yet in this process)
        self.last = last

    def write(self, model: nn.Module, prior: Prior, stage: str, *, keep_previous: bool = False,
              **extra: Any) -> Path:
        """Write the weights of ``model`` and ``prior`` as stage ``stage``, with the plain data
        ``extra``; ``keep_previous`` keeps what an earlier write stored and ``extra`` does not
        replace."""
        state: dict[str, Any] = {}
        if keep_previous:
            if self.last is not None:
                state = dict(self.last)
            elif self.path.is_file():
                state = load_torch(self.path)
        state.update({"format": CHECKPOINT_FORMAT, "stage": stage, "model": model.state_dict(),
                      "prior": prior.state_dict(), **extra})
        save_torch(self.path, state)
        # the weights are replaced by every write: only the rest is worth a copy
        self.last = {key: _cpu_copy(value) for key, value in state.items()
                     if key not in ("model", "prior")}
        return self.path


def _cpu_copy(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists, tuples) copied to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def save_checkpoint(path: Path, model: nn.Module, prior: Prior, stage: str, *,
                    keep_previous: bool = False, **extra: Any) -> Path:
    """Write the weights of ``model`` and ``prior`` to ``path`` as stage ``stage``, with the plain
    data ``extra`` (one write of a :class:`CheckpointWriter` that has seen nothing yet:
    ``keep_previous`` reads what the file holds)."""
    return CheckpointWriter(path).write(model, prior, stage, keep_previous=keep_previous,
                                        **extra)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (checked to be one of ours)."""
    state = load_torch(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"'{path}' is not a ncpvae checkpoint")
    return state


def load_checkpoint(path: Path, model: nn.Module, prior: Prior) -> dict[str, Any]:
    """Load the weights at ``path`` into ``model`` and ``prior``; return the checkpoint."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    load_prior_state(prior, state["prior"])
    return state


def load_prior_state(prior: Prior, state: dict[str, Tensor]) -> None:
    """Load a saved prior's weights, also across a prior swap: a learned prior gets the saved
    weights of its base (a run trained with ``gaussian`` refitted as ``ncp``), and a base prior
    gets the base part of a saved learned prior (sampling an NCP run's ``gaussian`` base)."""
    base_state = {k.removeprefix("base."): v for k, v in state.items() if k.startswith("base.")}
    attempts = [(prior, state), (prior, base_state), (prior.base_prior, state)]
    if prior.base_prior is not prior:  # a learned prior of another architecture: its base only
        attempts.append((prior.base_prior, base_state))
    for module, candidate in attempts:
        if not candidate:
            continue
        try:
            module.load_state_dict(candidate)
        except RuntimeError:
            continue
        return  # a learned prior given only its base's weights stays unfitted until fit-prior
    raise DataError(
        f"the checkpoint's prior weights do not fit a '{prior.name}' prior with this config; "
        "use the prior the run was trained with, or refit with `ncpvae fit-prior RUN --set "
        f"prior={prior.name}`")
