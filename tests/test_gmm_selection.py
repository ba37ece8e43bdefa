"""GMM component count and covariance type chosen on held-out likelihood (issue 21, finding 4;
docs/priors.md, "Fits that hold on small data")."""

from __future__ import annotations

import math

import pytest
import torch

import ncpvae


def mixture_encodings(means: torch.Tensor, cov_tril: torch.Tensor, n: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodings of a known mixture: means drawn from equal-weight Gaussians ``N(m_k, L L^T)``
    with tight posteriors (variance e^-6) around them."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(means), (n,), generator=g)
    eps = torch.randn(n, means.shape[1], 1, generator=g)
    mu = means[which] + (cov_tril[which] @ eps).squeeze(-1)
    return mu, torch.full_like(mu, -6.0)


def fitted(mu: torch.Tensor, logvar: torch.Tensor, **settings: object) -> ncpvae.Prior:
    prior = ncpvae.create("prior", "gmm", latent_dim=mu.shape[1], **settings)
    prior.fit(mu, logvar, generator=torch.Generator().manual_seed(0))
    return prior


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_picks_three_axis_aligned_components(seed: int) -> None:
    means = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -1.0]])
    tril = torch.diag_embed(torch.tensor([[0.5, 1.0, 0.3], [1.0, 0.4, 0.6], [0.7, 0.7, 0.2]]))
    prior = fitted(*mixture_encodings(means, tril, 1500, seed))
    assert (prior.components, prior.covariance) == (3, "diag")
    assert prior.label == "GMM (K=3, diag, chosen)"
    chosen = [row for row in prior.fit_summary["selection"] if row["chosen"]]
    assert len(chosen) == 1 and len(prior.fit_summary["selection"]) == 12


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_picks_two_correlated_full_components(seed: int) -> None:
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    rho = 0.95
    tril = torch.linalg.cholesky(torch.tensor([[[1.0, rho], [rho, 1.0]],
                                               [[1.0, -rho], [-rho, 1.0]]]))
    prior = fitted(*mixture_encodings(means, tril, 1500, seed))
    assert (prior.components, prior.covariance) == (2, "full")


def test_small_data_is_not_given_the_old_ten_full_components() -> None:
    """One Gaussian blob of 300 encodings in 8 dims: the old default (K = 10, full) overfits it
    (worse held-out likelihood); the choice is a single component."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(300, 8, generator=g)
    logvar = torch.full_like(mu, math.log(0.1))
    chosen = fitted(mu, logvar)
    assert chosen.components == 1
    old = fitted(mu, logvar, components=10, covariance="full")
    z = mu[:50] + torch.randn(200, 50, 8, generator=g) * math.sqrt(0.1)
    assert chosen.log_prob(z).mean() > old.log_prob(z).mean()


def test_explicit_values_fit_that_mixture_and_auto_state_dicts_load() -> None:
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
    mu, logvar = mixture_encodings(means, torch.eye(2).expand(2, 2, 2) * 0.5, 800, 0)
    explicit = fitted(mu, logvar, components=4, covariance="full")
    assert (explicit.components, explicit.label) == (4, "GMM (K=4, full)")
    assert "selection" not in explicit.fit_summary
    only_k = fitted(mu, logvar, covariance="diag")  # K auto, covariance given
    assert {row["covariance"] for row in only_k.fit_summary["selection"]} == {"diag"}
    fresh = ncpvae.create("prior", "gmm", latent_dim=2)  # K=1 full until loaded
    assert fresh.label == "GMM (K=auto, auto)"
    fresh.load_state_dict(only_k.state_dict())
    assert (fresh.components, fresh.covariance, fresh.is_fitted) == (
        only_k.components, "diag", True)
    z = torch.randn(10, 2)
    assert torch.equal(fresh.log_prob(z), only_k.log_prob(z))
