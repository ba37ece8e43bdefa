"""KL warm-up, free bits and the capacity schedule of ``beta_elbo``, checked against their formulas.

The model below has a fixed posterior (``mu``, ``logvar`` chosen per test) and a decoder whose
logits are 0 whatever z is, so ``log p(x|z) = -P ln 2`` exactly for a P-pixel binary image and
every loss is a closed form of ``mu`` and ``logvar``:
``KL_j = 0.5 * (mu_j^2 + exp(logvar_j) - logvar_j - 1)`` against N(0, I).
"""

from __future__ import annotations

import math

import pytest
import torch
from ncpvae_plugins.beta_elbo import BetaELBO
from torch import Tensor, nn

import ncpvae
from ncpvae import ConfigError, LatentModel
from ncpvae.config import validate_config

PIXELS = 4  # images (B, 1, 2, 2)


class FixedPosterior(LatentModel):
    """``q(z|x) = N(mu_b, exp(logvar_b))`` for the b-th image, logits 0 (``log p = -P ln 2``)."""

    def __init__(self, mu: Tensor, logvar: Tensor):
        super().__init__(mu.shape[1])
        self.mu = nn.Parameter(mu.clone())
        self.logvar = nn.Parameter(logvar.clone())
        self.bias = nn.Parameter(torch.zeros(()))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu[: len(x)], self.logvar[: len(x)]

    def decode(self, z: Tensor) -> Tensor:
        return (0.0 * z.sum(-1) + self.bias.detach()).reshape(*z.shape[:-1], 1, 1, 1).expand(
            *z.shape[:-1], 1, 2, 2)


def kl_by_hand(mu: Tensor, logvar: Tensor) -> Tensor:
    """``(B, D)`` per-dimension KL of N(mu, exp(logvar)) from N(0, 1)."""
    return 0.5 * (mu**2 + logvar.exp() - logvar - 1.0)


def setup(mu: list[list[float]], logvar: list[list[float]] | None = None):
    mu_t = torch.tensor(mu, dtype=torch.float64)
    lv_t = torch.zeros_like(mu_t) if logvar is None else torch.tensor(logvar, dtype=torch.float64)
    model = FixedPosterior(mu_t, lv_t).double()
    prior = ncpvae.create("prior", "gaussian", latent_dim=mu_t.shape[1]).double()
    batch = torch.ones(len(mu_t), 1, 2, 2, dtype=torch.float64)
    return model, prior, batch, mu_t, lv_t


RECON = PIXELS * math.log(2.0)  # -log p(x|z) per example


@pytest.mark.parametrize("step", [0, 1, 250, 999, 1000, 5000])
def test_warmup_follows_linear_schedule(step: int) -> None:
    model, prior, batch, mu, lv = setup([[1.0, -2.0], [0.5, 0.0]], [[0.0, -1.0], [0.3, 0.0]])
    beta, warm = 2.0, 1000
    objective = BetaELBO(beta=beta, warmup_steps=warm)
    out = objective.loss(batch, model, prior, step=step)
    kl = kl_by_hand(mu, lv).sum(1).mean().item()
    expected = RECON + beta * min(1.0, step / warm) * kl
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    # the logged terms are the plain ELBO's, whatever the schedule
    assert out["kl"].item() == pytest.approx(kl, rel=1e-12)
    assert out["elbo"].item() == pytest.approx(-RECON - kl, rel=1e-12)
    assert objective.beta_at(step) == pytest.approx(beta * min(1.0, step / warm))


def test_warmup_at_step_zero_puts_no_gradient_on_the_posterior() -> None:
    model, prior, batch, _, _ = setup([[1.0, -2.0]])
    out = BetaELBO(beta=1.0, warmup_steps=10).loss(batch, model, prior, step=0)
    (grad_mu,) = torch.autograd.grad(out["loss"], [model.mu])
    assert torch.count_nonzero(grad_mu) == 0


@pytest.mark.parametrize("lam", [0.05, 0.25, 1.0, 10.0])
def test_free_bits_clamps_the_batch_mean_kl_per_dimension(lam: float) -> None:
    # dims with batch-mean KLs of very different sizes: 0.01.., 0.5.., 2.0..
    mu = [[0.1, 1.0, 2.0], [0.2, 1.0, 2.0], [0.0, 1.0, 2.0]]
    model, prior, batch, mu_t, lv_t = setup(mu)
    beta = 1.5
    out = BetaELBO(beta=beta, free_bits=lam).loss(batch, model, prior, step=0)
    per_dim = kl_by_hand(mu_t, lv_t).mean(0)
    expected = RECON + beta * sum(max(lam, float(k)) for k in per_dim)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    # dims under lambda get no gradient; dims above it get beta * dKL/dmu = beta * mu / B
    (grad_mu,) = torch.autograd.grad(out["loss"], [model.mu])
    for j, k in enumerate(per_dim):
        if k < lam:
            assert torch.count_nonzero(grad_mu[:, j]) == 0
        else:
            assert torch.allclose(grad_mu[:, j], beta * mu_t[:, j] / len(mu_t))


def test_free_bits_is_on_the_batch_mean_not_per_example() -> None:
    # per-example KLs of dim 0 are 0 and 0.5 (mean 0.25); lambda = 0.3: batch mean is clamped
    mu = [[0.0], [1.0]]
    model, prior, batch, _, _ = setup(mu)
    out = BetaELBO(beta=1.0, free_bits=0.3).loss(batch, model, prior)
    assert out["loss"].item() == pytest.approx(RECON + 0.3, rel=1e-12)
    # a per-example clamp would give mean(max(0.3, 0), max(0.3, 0.5)) = 0.4


def test_free_bits_combines_with_warmup() -> None:
    model, prior, batch, mu_t, lv_t = setup([[0.1, 2.0]])
    out = BetaELBO(beta=1.0, free_bits=0.5, warmup_steps=100).loss(batch, model, prior, step=25)
    kl = kl_by_hand(mu_t, lv_t)[0]
    expected = RECON + 0.25 * (max(0.5, float(kl[0])) + max(0.5, float(kl[1])))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [0, 300, 1000, 2000])
def test_capacity_acts_on_the_batch_mean_kl(step: int) -> None:
    # per-example KLs 0.5 and 4.5 (mean 2.5): the batch-mean term |2.5 - C| differs from the
    # per-example mean |KL_i - C| whenever C lies between them
    mu = [[1.0, 0.0], [3.0, 0.0]]
    model, prior, batch, mu_t, lv_t = setup(mu)
    gamma, c_max, c_steps = 100.0, 4.0, 1000
    objective = BetaELBO(capacity_max=c_max, capacity_steps=c_steps, gamma=gamma)
    out = objective.loss(batch, model, prior, step=step)
    kl_i = kl_by_hand(mu_t, lv_t).sum(1)
    assert kl_i.tolist() == pytest.approx([0.5, 4.5])
    c = c_max * min(1.0, step / c_steps)
    expected = RECON + gamma * abs(2.5 - c)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)


def test_capacity_at_the_batch_mean_is_minimal_when_mean_kl_equals_c() -> None:
    model, prior, batch, _, _ = setup([[1.0, 0.0], [3.0, 0.0]])
    out = BetaELBO(capacity_max=2.5, capacity_steps=1, gamma=1000.0).loss(
        batch, model, prior, step=10)
    assert out["loss"].item() == pytest.approx(RECON, rel=1e-12)  # |mean KL - C| = 0


def test_plain_loss_without_options_is_the_beta_elbo() -> None:
    model, prior, batch, mu_t, lv_t = setup([[1.0, -2.0], [0.5, 0.0]], [[0.0, -1.0], [0.3, 0.0]])
    out = BetaELBO(beta=0.75).loss(batch, model, prior, step=123)
    kl = kl_by_hand(mu_t, lv_t).sum(1).mean().item()
    assert out["loss"].item() == pytest.approx(RECON + 0.75 * kl, rel=1e-12)


def test_options_validate(registry) -> None:
    base = {"name": "beta_elbo", "capacity_max": 5.0}
    for extra in ({"warmup_steps": 10}, {"free_bits": 0.1}):
        with pytest.raises(ConfigError, match="capacity_max replaces beta"):
            validate_config({"objective": {**base, **extra}}, registry)
    for bad in ({"free_bits": -1.0}, {"warmup_steps": -5}, {"beta": float("inf")}):
        with pytest.raises(ConfigError):
            validate_config({"objective": {"name": "beta_elbo", **bad}}, registry)
    config = validate_config(
        {"objective": {"name": "beta_elbo", "warmup_steps": 500, "free_bits": 0.25}}, registry)
    assert config.objective.warmup_steps == 500


def test_objective_contract_with_remedies() -> None:
    from ncpvae.testing import check_objective

    model = ncpvae.create("model", "mlp", latent_dim=3, image_shape=(1, 8, 8), hidden=[16])
    prior = ncpvae.create("prior", "gaussian", latent_dim=3)
    batch = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for objective in (BetaELBO(warmup_steps=10, free_bits=0.2), BetaELBO(capacity_max=3.0)):
        check_objective(objective, model, prior, batch, step=5)
