"""Figures for sampler runs: energy traces and chain trajectories over energy contours.

Drawn with matplotlib's Agg canvas directly (no pyplot global state, no display needed) and
saved atomically: the figure goes to a temporary file in the destination folder, then
``os.replace`` moves it into place, so a reader never sees a half-written image.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ncpvae.errors import DataError
from ncpvae.plots.training import save_figure
from ncpvae.sampler import Energy


def plot_energy_traces(energies: Tensor, path: str | os.PathLike, *, max_chains: int = 16,
                       title: str = "Energy per chain") -> Path:
    """Energy per chain over steps, e.g. ``result.info["energy"]`` ``(S, C)``.

    Draws up to ``max_chains`` individual traces plus the median and the 10–90 % band over all
    chains (so thousands of chains stay readable).
    """
    e = energies.detach().to(torch.float64).cpu()
    if e.ndim != 2 or e.shape[0] < 1:
        raise DataError(f"plot_energy_traces: expected energies (S, C), got {tuple(e.shape)}")
    steps = torch.arange(1, e.shape[0] + 1).numpy()
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for c in range(min(max_chains, e.shape[1])):
        ax.plot(steps, e[:, c].numpy(), lw=0.7, alpha=0.6)
    if e.shape[1] > 1:
        finite = torch.where(torch.isfinite(e), e, torch.nan)
        q = torch.nanquantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=e.dtype), dim=1)
        ax.fill_between(steps, q[0].numpy(), q[2].numpy(), color="grey", alpha=0.25,
                        label="10–90 % of chains")
        ax.plot(steps, q[1].numpy(), color="black", lw=1.5, label="median")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("energy U(z)")
    ax.set_title(f"{title} ({e.shape[1]} chains)")
    return save_figure(fig, path)


def principal_plane(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and the first two principal axes ``(2, D)`` of ``(S, C, D)`` samples
    (a zero second axis when D = 1)."""
    flat = samples.detach().reshape(-1, samples.shape[-1]).to(torch.float64)
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    axes = vh[:2]
    if axes.shape[0] < 2:
        axes = torch.cat([axes, torch.zeros_like(axes)])
    return mean, axes


def plot_trajectories(samples: Tensor, energy: Energy | None, path: str | os.PathLike,
                      num_chains: int = 8, *, grid_size: int = 60,
                      title: str = "Chain trajectories") -> Path:
    """A few chains' paths in the plane of the samples' first two principal axes.

    ``samples`` ``(S, C, D)``; ``energy`` (or None for no contours) is evaluated on a
    ``grid_size²`` grid of that plane (through the sample mean), so it must accept any number of
    rows (prior energies do; a per-image posterior energy does not: pass None).
    """
    x = samples.detach()
    if x.ndim != 3 or x.shape[0] < 1:
        raise DataError(f"plot_trajectories: expected samples (S, C, D), got {tuple(x.shape)}")
    mean, axes = principal_plane(x)
    proj = (x.to(torch.float64).cpu() - mean.cpu()) @ axes.cpu().T  # (S, C, 2)
    fig = Figure(figsize=(6, 5.5))
    ax = fig.add_subplot()
    lo = proj.reshape(-1, 2).min(0).values
    hi = proj.reshape(-1, 2).max(0).values
    pad = 0.1 * (hi - lo).clamp(min=1e-3)
    lo, hi = lo - pad, hi + pad
    if energy is not None:
        ga = torch.linspace(float(lo[0]), float(hi[0]), grid_size, dtype=torch.float64)
        gb = torch.linspace(float(lo[1]), float(hi[1]), grid_size, dtype=torch.float64)
        aa, bb = torch.meshgrid(ga, gb, indexing="xy")
        plane = torch.stack([aa.reshape(-1), bb.reshape(-1)], -1)  # (G*G, 2)
        points = (mean + plane.to(mean.device) @ axes).to(dtype=x.dtype, device=x.device)
        with torch.no_grad():
            u = energy(points).detach().to(torch.float64).cpu().reshape(grid_size, grid_size)
        u = u - u[torch.isfinite(u)].min()
        top = float(torch.quantile(u[torch.isfinite(u)], 0.95))
        levels = torch.linspace(0.0, max(top, 1e-9), 15).numpy()
        filled = ax.contourf(aa.numpy(), bb.numpy(), u.numpy(), levels=levels, extend="max",
                             cmap="viridis", alpha=0.8)
        fig.colorbar(filled, ax=ax, label="energy U(z) − min (on this plane)")
    for c in range(min(num_chains, x.shape[1])):
        path_c = proj[:, c].numpy()
        ax.plot(path_c[:, 0], path_c[:, 1], "-", lw=1.0, alpha=0.9)
        ax.plot(path_c[:1, 0], path_c[:1, 1], "o", ms=4, color="tab:orange")
        ax.plot(path_c[-1:, 0], path_c[-1:, 1], "s", ms=4, color="tab:red")
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.set_title(f"{title} ({min(num_chains, x.shape[1])} chains; o start, □ end)")
    return save_figure(fig, path)
