"""Figures of a learned prior's fit: its per-epoch fit records (a classifier's loss curves
when the records hold them).

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
from ncpvae.plots.training import save_figure

_REQUIRED = ("epoch", "train_loss_mean", "train_loss_min", "heldout_loss")


def plot_fit_history(history: Sequence[Mapping[str, object]], path: str | os.PathLike[str], *,
                     title: str = "learned prior fit") -> Path:
    """Plot a learned prior's per-epoch fit records (what ``LearnedPrior.fit`` passed to ``log``).

    Records with a classifier's losses (``epoch``, ``train_loss_mean``, ``train_loss_min``,
    ``heldout_loss``, as the NCP prior logs) get :func:`plot_classifier_loss`; any others get
    one curve per numeric key against ``epoch`` (or the record index). Returns the path.
    """
    if not history:
        raise DataError(f"cannot plot the {title}: the fit history is empty")
    if all(all(key in record for key in _REQUIRED) for record in history):
        return plot_classifier_loss(history, path, title=f"{title}: classifier loss")
    x = [float(r["epoch"]) if isinstance(r.get("epoch"), (int, float)) else float(i + 1)
         for i, r in enumerate(history)]
    keys = [k for k in dict.fromkeys(k for r in history for k in r)
            if k != "epoch" and all(isinstance(r.get(k), (int, float))
                                    and not isinstance(r.get(k), bool) for r in history)]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for key in keys:
        ax.plot(x, [float(r[key]) for r in history], marker="o" if len(x) <= 50 else None,
                ms=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_classifier_loss(history: Sequence[Mapping[str, float]],
                         path: str | os.PathLike[str], *,
                         title: str = "NCP classifier loss") -> Path:
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
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_group_gains(delta: Sequence[float], se: Sequence[float], path: str | os.PathLike[str], *,
                     title: str = "hierarchical NCP: gain per latent group") -> Path:
    """Bars of the per-group gains ``Delta_k`` (nats, top group first) with ±2 SE whiskers and
    the zero line; returns the path."""
    if not delta or len(delta) != len(se):
        raise DataError(f"cannot plot per-group gains: got {len(delta)} gains and {len(se)} SEs")
    groups = list(range(1, len(delta) + 1))
    fig = Figure(figsize=(1.2 * len(delta) + 2.6, 3.4))
    ax = fig.add_subplot()
    ax.bar(groups, [float(d) for d in delta], yerr=[2 * float(e) for e in se], capsize=4,
           color="tab:blue", alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(groups, [f"group {k}" for k in groups])
    ax.set_ylabel("Delta_k (nats), ±2 SE")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["plot_classifier_loss", "plot_fit_history", "plot_group_gains"]
