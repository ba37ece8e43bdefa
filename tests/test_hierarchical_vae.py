"""The hierarchical VAE plugins: the ``hierarchical`` model, its top-down prior and the
``hierarchical_elbo`` objective (docs/hierarchical.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ncpvae_plugins.hierarchical.model import HierarchicalVAE, split_evenly
from ncpvae_plugins.hierarchical.objective import HierarchicalELBO, gaussian_kl
from ncpvae_plugins.hierarchical.prior import ModelHierarchicalPrior

from ncpvae.errors import ConfigError
from ncpvae.hierarchical import HierarchicalPrior


def _model(shape=(1, 28, 28), latent_dim=6, groups=3, likelihood="bernoulli") -> HierarchicalVAE:
    torch.manual_seed(0)
    extra = {"learn_scale": True} if likelihood == "discretized_logistic" else {}
    return HierarchicalVAE(shape, latent_dim, groups, channels=4, hidden=16,
                           likelihood=likelihood, **extra)


def _bound_prior(model: HierarchicalVAE) -> ModelHierarchicalPrior:
    prior = ModelHierarchicalPrior(model.latent_dim)
    prior.bind_model(model)
    return prior


@settings(derandomize=True, max_examples=6, deadline=None)
@given(latent_dim=st.integers(1, 12), groups=st.integers(2, 4))
def test_split_evenly_sums_and_puts_larger_groups_on_top(latent_dim, groups):
    sizes = split_evenly(latent_dim, groups)
    assert sum(sizes) == latent_dim and len(sizes) == min(groups, latent_dim)
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 32, 32), (3, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized_logistic"])
def test_shapes_for_every_image_size_and_likelihood(shape, likelihood):
    model = _model(shape, 8, 4, likelihood)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    if likelihood == "discretized_logistic":
        x = (x * 255).round() / 255
    z, stats = model.posterior(x)
    assert z.shape == (3, 8) and len(stats) == 4
    assert all(t.shape == (3, 2) for group in stats for t in group)
    params = model.decode(z)
    assert params.shape == (3, *shape)
    assert model.recon_log_prob(x, params).shape == (3,)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 8)


def test_the_prior_conditionals_are_the_ones_the_posterior_path_uses():
    model = _model()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, stats = model.posterior(x, generator=torch.Generator().manual_seed(2))
        prior = _bound_prior(model)
        assert prior.group_sizes == (2, 2, 2)
        for k, (_, _, mu_p, logvar_p) in enumerate(stats):
            mean, logvar = prior.conditional(k, z[:, :2 * k])
            torch.testing.assert_close(mean, mu_p)
            torch.testing.assert_close(logvar, logvar_p)
        draws = prior.sample(7, generator=torch.Generator().manual_seed(3))
        assert draws.shape == (7, 6) and prior.log_prob(draws).shape == (7,)
    assert isinstance(prior, HierarchicalPrior)


def test_the_prior_is_standard_normal_on_a_flat_model():
    prior = ModelHierarchicalPrior(3)
    prior.bind_model(torch.nn.Module())  # no groups: N(0, I)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), expected)


def test_gaussian_kl_is_torchs():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(10, 3, generator=g) for _ in range(4))
    q = torch.distributions.Normal(a, torch.exp(0.5 * b))
    p = torch.distributions.Normal(c, torch.exp(0.5 * d))
    torch.testing.assert_close(gaussian_kl(a, b, c, d), torch.distributions.kl_divergence(q, p))


def test_objective_sums_per_group_kls_and_logs_each():
    model = _model()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    out = HierarchicalELBO().loss(x, model, _bound_prior(model))
    groups = [out[f"kl_group{k}"] for k in (1, 2, 3)]
    torch.testing.assert_close(sum(groups), out["kl"])
    torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"])
    torch.testing.assert_close(out["loss"].detach(), out["recon"] + out["kl"])
    torch.testing.assert_close(out["elbo"], -out["loss"].detach())


def test_warm_up_free_bits_and_balancing_change_only_the_loss():
    model = _model()
    prior = _bound_prior(model)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    objective = HierarchicalELBO(warmup_steps=[10, 20, 40], free_bits=0.0, kl_balancing=True)
    assert objective.betas(10, 3) == [1.0, 0.5, 0.25]
    assert HierarchicalELBO(warmup_steps=10).betas(5, 3) == [0.5] * 3
    torch.manual_seed(7)
    plain = HierarchicalELBO().loss(x, model, prior)
    for variant in (objective, HierarchicalELBO(free_bits=5.0)):
        torch.manual_seed(7)
        out = variant.loss(x, model, prior, step=5)
        torch.testing.assert_close(out["elbo"], plain["elbo"])  # the logged bound is plain
        assert not torch.equal(out["loss"], plain["loss"])
    torch.manual_seed(7)  # free bits: every group below 5 nats per dim is held at 5
    out = HierarchicalELBO(free_bits=5.0).loss(x, model, prior)
    assert float(out["kl_per_dim"].max()) < 5.0  # a fresh model: every dim is below 5 nats
    torch.testing.assert_close(out["loss"].detach(), out["recon"] + 5.0 * 6)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="warmup_steps"):
        HierarchicalELBO(warmup_steps=-1)
    with pytest.raises(ConfigError, match="one per group"):
        HierarchicalELBO(warmup_steps=[1, 2]).check_compatible(_model(), ModelHierarchicalPrior(6))
    from ncpvae_plugins.models import MLPVAE

    flat = MLPVAE((1, 8, 8), 4)
    with pytest.raises(ConfigError, match="needs a hierarchical model"):
        HierarchicalELBO().check_compatible(flat, ModelHierarchicalPrior(4))


def test_a_few_steps_reduce_the_loss():
    model = _model(latent_dim=4, groups=2)
    prior = _bound_prior(model)
    x = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(8)) > 0.7).float()
    objective = HierarchicalELBO()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(9)
    first = float(objective.loss(x, model, prior)["loss"].detach())
    for _ in range(30):
        loss = objective.loss(x, model, prior)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(9)
    assert float(objective.loss(x, model, prior)["loss"].detach()) < first - math.log(2)
