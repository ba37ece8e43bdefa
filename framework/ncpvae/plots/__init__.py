"""Figures: image grids and training curves (``training``), the prior fit (``prior_fit``),
sampler traces and trajectories (``samplers``). Every function draws on matplotlib's Agg canvas
(no pyplot) and writes its PNG atomically."""

from ncpvae.plots.prior_fit import plot_classifier_loss, plot_fit_history, plot_group_gains
from ncpvae.plots.samplers import plot_energy_traces, plot_trajectories
from ncpvae.plots.training import (
    image_grid,
    plot_image_grid,
    plot_kl_per_dim,
    plot_reconstructions,
    plot_sample_panels,
    plot_training_curves,
    plot_traversals,
    save_figure,
)

__all__ = ["image_grid", "plot_classifier_loss", "plot_energy_traces", "plot_fit_history",
           "plot_group_gains", "plot_image_grid", "plot_kl_per_dim", "plot_reconstructions",
           "plot_sample_panels",
           "plot_training_curves", "plot_trajectories", "plot_traversals", "save_figure"]
