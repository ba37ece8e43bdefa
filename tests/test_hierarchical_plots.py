"""The training plots of a hierarchical run: a KL-per-group panel beside the loss terms, and the
KL-per-dimension bars coloured by group with each group's count of used dimensions."""

from __future__ import annotations

import torch

import ncpvae.plots.training as training


def _capture(monkeypatch) -> list:
    figures = []

    def keep(fig, path, **_):
        figures.append(fig)
        return path

    monkeypatch.setattr(training, "save_figure", keep)
    return figures


def test_training_curves_add_a_kl_per_group_panel(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    records = [{"epoch": e, "train_loss": 10.0 / e, "test_loss": 11.0 / e,
                "test_kl_group1": 0.5 * e, "test_kl_group2": 2.0 * e} for e in (1, 2, 3)]
    training.plot_training_curves(records, tmp_path / "curves.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "KL per latent group (top = 1)"]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes[1].get_lines()}
    assert lines == {"group 1": [0.5, 1.0, 1.5], "group 2": [2.0, 4.0, 6.0]}


def test_flat_runs_keep_their_panels(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    training.plot_training_curves([{"epoch": 1, "train_kl": 1.0, "test_elbo": -3.0}],
                                  tmp_path / "curves.png")
    assert [ax.get_title() for ax in figures[0].axes] == ["kl", "elbo"]


def test_kl_bars_by_group_count_the_used_dimensions(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    kl = torch.tensor([0.5, 0.0, 2.0, 0.001, 0.02, 0.3])
    training.plot_kl_per_dim(kl, tmp_path / "kl.png", group_sizes=[2, 4])
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["group 1: 1 of 2 dims with KL > 0.01",
                      "group 2: 3 of 4 dims with KL > 0.01"]
    training.plot_kl_per_dim(kl, tmp_path / "kl.png", group_sizes=[2, 3])  # sizes must add up
    assert figures[1].axes[0].get_legend() is None
