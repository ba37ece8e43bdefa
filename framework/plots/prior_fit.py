"""Figures of a learned prior's fit (the NCP classifier's loss curves).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) and
written atomically: to a temporary file in the target folder, then ``os.replace``, so a crash
never leaves a half-written PNG where the run directory expects one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ncpvae.errors import DataError
from ncpvae.plots import save_figure

_REQUIRED = ("epoch", "train_loss_mean", "train_loss_min", "heldout_loss")


def plot_classifier_loss(history: Sequence[Mapping[str, float]],
                         path: str | os.PathLike[str]) -> Path:
    """Plot the NCP classifier's BCE per epoch and save it to ``path``.

    ``history`` is the list of per-epoch records of ``NCPPrior.fit`` (keys ``epoch``,
    ``train_loss_mean``, ``train_loss_min``, ``heldout_loss``). Draws the average and the
    lowest minibatch training loss, the held-out loss with its best epoch marked, and the
    chance level ``log 2`` (a classifier that learned nothing sits on it). Returns the path.
    """
    if not history:
        raise DataError("cannot plot the NCP classifier loss: the history is empty")
    for i, record in enumerate(history):
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise DataError(f"NCP classifier history record {i} lacks {', '.join(missing)}; "
                            f"expected the records logged by NCPPrior.fit")
    epochs = [float(r["epoch"]) for r in history]
    mean = [float(r["train_loss_mean"]) for r in history]
    lowest = [float(r["train_loss_min"]) for r in history]
    heldout = [float(r["heldout_loss"]) for r in history]

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    marker = "o" if len(history) <= 50 else None
    ax.plot(epochs, mean, marker=marker, ms=3, label="training (epoch average)")
    ax.plot(epochs, lowest, marker=marker, ms=3, ls="--", label="training (lowest minibatch)")
    ax.plot(epochs, heldout, marker=marker, ms=3, label="held-out")
    best = min(range(len(heldout)), key=lambda i: heldout[i])
    ax.axvline(epochs[best], color="grey", lw=0.8, ls="-.",
               label=f"best epoch ({epochs[best]:g})")
    ax.axhline(math.log(2), color="black", lw=0.8, ls=":", label="chance (log 2)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE")
    ax.set_title("NCP classifier loss")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["plot_classifier_loss"]
