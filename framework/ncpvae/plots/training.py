"""Figures of a run: training curves, image grids, latent traversals.

All functions take plain tensors/records and a path, draw on matplotlib's Agg canvas (no pyplot,
no display) and write the PNG atomically.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ncpvae.io import atomic_write


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Save a figure atomically (format from the suffix, PNG by default).

    Every figure of the package is a bare ``matplotlib.figure.Figure`` rendered by the Agg
    canvas: no pyplot state, no global backend switch (a notebook importing ncpvae keeps its
    own backend), no display needed."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"),
                        binary=True)


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
              squeeze: bool = True) -> tuple[Figure, Any]:
    """``plt.subplots`` without pyplot: a new Agg-backed figure and its axes."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def image_grid(images: Tensor, nrow: int) -> Tensor:
    """Tile ``(N, C, H, W)`` images in [0, 1] into one ``(H', W', C)`` array with 1-px gaps."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    ncol = nrow
    rows = math.ceil(n / ncol)
    grid = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = images[i]
    return grid.permute(1, 2, 0)


def _show(ax: Any, grid: Tensor) -> None:
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_grid(images: Tensor, path: str | Path, *, title: str, nrow: int = 8) -> Path:
    """A grid of ``(N, C, H, W)`` images in [0, 1]."""
    grid = image_grid(images, nrow)
    fig, ax = _subplots(figsize=(0.9 * nrow + 0.5, 0.9 * math.ceil(len(images) / nrow) + 0.7))
    _show(ax, grid)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_reconstructions(originals: Tensor, reconstructions: Tensor, path: str | Path) -> Path:
    """Pairs of rows: test images above their reconstructions (decoder means)."""
    n = min(len(originals), 16)
    nrow = 8
    stacked = []
    for start in range(0, n, nrow):
        stacked += [originals[start:start + nrow], reconstructions[start:start + nrow]]
    grid = image_grid(torch.cat(stacked), nrow)
    fig, ax = _subplots(figsize=(8, 1.0 * len(stacked) + 0.6))
    _show(ax, grid)
    ax.set_title("test images (odd rows) and their reconstructions (even rows)")
    return save_figure(fig, path)


def plot_sample_panels(panels: dict[str, Tensor], path: str | Path, *, nrow: int = 8) -> Path:
    """Decoded samples side by side, one panel per prior/sampler (e.g. N(0, I), NCP by SIR)."""
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items()):
        _show(ax, image_grid(images, nrow))
        ax.set_title(title)
    fig.suptitle("decoded prior samples")
    return save_figure(fig, path)


def plot_traversals(model: Any, anchor_mu: Tensor, kl_per_dim: Tensor, path: str | Path, *,
                    num_values: int = 9, span: float = 2.5, max_dims: int = 10) -> Path:
    """Latent traversals: one row per latent dim (sorted by KL, largest first), the anchor's
    mean code with that dim set to values in ``[-span, span]``, decoded."""
    order = torch.argsort(kl_per_dim.cpu(), descending=True)[:max_dims]
    values = torch.linspace(-span, span, num_values)
    rows = []
    with torch.no_grad():
        for dim in order.tolist():
            codes = anchor_mu.reshape(1, -1).repeat(num_values, 1).clone()
            codes[:, dim] = values.to(codes)
            rows.append(model.mean_image(model.decode(codes)).cpu())
    grid = image_grid(torch.cat(rows), num_values)
    fig, ax = _subplots(figsize=(0.8 * num_values + 1.5, 0.8 * len(rows) + 0.8))
    _show(ax, grid)
    h = rows[0].shape[-2] + 1
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))])
    ax.set_yticklabels([f"z{d} ({float(kl_per_dim[d]):.2f} nats)" for d in order.tolist()])
    ax.set_xticks([(rows[0].shape[-1] + 1) * (i + 0.5) for i in range(num_values)])
    ax.set_xticklabels([f"{v:.1f}" for v in values.tolist()])
    ax.set_title("latent traversals (rows sorted by KL)")
    return save_figure(fig, path)


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path,
                         terms: Sequence[str] = ("loss", "recon", "kl", "elbo")) -> Path:
    """Per-epoch training (and test, where logged) values of every loss term."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for term in terms:
            for split in ("train", "test"):
                key = f"{split}_{term}"
                if key in rec and rec[key] is not None:
                    series[term][split].append((rec["epoch"], rec[key]))
    present = [t for t in terms if series[t]]
    # a hierarchical objective's per-group KLs (kl_group1..K): one more panel, a line per group
    groups = sorted({int(key[len("test_kl_group"):]) for rec in records for key in rec
                     if key.startswith("test_kl_group") and key[len("test_kl_group"):].isdigit()})
    panels = len(present) + (1 if groups else 0)
    fig, axes = _subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    for ax, term in zip(axes[0], present):
        for split, points in series[term].items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{term} (nats / image)")
        ax.set_title(term)
        ax.legend()
        ax.grid(alpha=0.3)
    if groups:
        ax = axes[0][-1]
        for k in groups:
            points = [(rec["epoch"], rec[f"test_kl_group{k}"]) for rec in records
                      if rec.get(f"test_kl_group{k}") is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=3, label=f"group {k}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test KL (nats / image)")
        ax.set_title("KL per latent group (top = 1)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_kl_per_dim(kl_per_dim: Tensor, path: str | Path,
                    group_sizes: Sequence[int] | None = None) -> Path:
    """Bar chart of the test KL per latent dimension (which dims are active); with
    ``group_sizes`` (a hierarchical latent, top group first) the bars are coloured by group and
    the legend gives each group's count of dimensions with a KL above 0.01 nats."""
    kl = kl_per_dim.detach().cpu()
    fig, ax = _subplots(figsize=(max(4, 0.35 * len(kl) + 1), 3))
    if group_sizes and sum(group_sizes) == len(kl) and len(group_sizes) > 1:
        start = 0
        for k, size in enumerate(group_sizes, 1):
            part = kl[start:start + size]
            used = int((part > 0.01).sum())
            ax.bar(range(start, start + size), part.tolist(),
                   label=f"group {k}: {used} of {size} dims with KL > 0.01")
            start += size
        ax.legend(fontsize="small")
    else:
        ax.bar(range(len(kl)), kl.tolist())
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL per latent dimension (test set)")
    return save_figure(fig, path)
