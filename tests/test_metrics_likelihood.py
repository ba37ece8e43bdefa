"""Likelihood bounds on a linear-Gaussian model whose log marginal is known in closed form.

Model: z ~ N(0, I_D), x | z ~ N(W z + b, s^2 I_P) with W = Q diag(c), Q having orthonormal
columns. Then p(x) = N(b, W W' + s^2 I) and the exact posterior is diagonal:
Var = 1 / (1 + c^2 / s^2), mean = Var * W'(x - b) / s^2. With that posterior as the encoder every
importance weight equals p(x), so the ELBO and the IW bound are exact for every K.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncpvae.errors import ConfigError, NonFiniteError
from ncpvae.metrics import bounds, elbo, evaluate_likelihood, iw_bound, summarize_bound
from ncpvae.model import LatentModel
from ncpvae.prior import Prior

P, D, S = 6, 3, 0.5


class StandardNormal(Prior):
    name = "test-normal"

    def log_prob(self, z):
        return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, n, *, generator=None):
        return torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)


class ShiftedNormal(StandardNormal):
    """N(0, I) times exp(c): unnormalized, with log Z = c exactly."""

    name = "test-shifted"
    normalized = False
    shift = 2.5

    def log_prob(self, z):
        return super().log_prob(z) + self.shift


class LinearGaussian(LatentModel):
    name = "test-linear-gaussian"

    def __init__(self, mean_scale: float = 1.0, var_scale: float = 1.0):
        super().__init__(D, likelihood="gaussian", gaussian_scale=S)
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(P, D, generator=gen, dtype=torch.float64))
        self.register_buffer("c", torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        self.register_buffer("W", q * self.c)
        self.register_buffer("b", torch.randn(P, generator=gen, dtype=torch.float64))
        self.post_var = 1.0 / (1.0 + self.c**2 / S**2)
        self.mean_scale, self.var_scale = mean_scale, var_scale
        self.double()
        self.log_scale.fill_(math.log(S))  # in float64, not the float32 rounding of log(S)

    def encode(self, x):
        mu = self.post_var * ((x.flatten(1) - self.b) @ self.W) / S**2
        logvar = torch.log(self.post_var * self.var_scale).expand_as(mu)
        return self.mean_scale * mu, logvar

    def decode(self, z):
        return (z @ self.W.T + self.b).view(-1, 1, 1, P)

    def sample_x(self, n: int, seed: int) -> torch.Tensor:
        # Offset so the data's noise never reuses a stream that the bound's draws use (gen(k)).
        gen = torch.Generator().manual_seed(10_000 + seed)
        z = torch.randn(n, D, generator=gen, dtype=torch.float64)
        x = z @ self.W.T + self.b + S * torch.randn(n, P, generator=gen, dtype=torch.float64)
        return x.view(n, 1, 1, P)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + S**2 * torch.eye(P, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov)
        return dist.log_prob(x.flatten(1))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_samples,max_batch", [(1, 4096), (7, 4096), (40, 64)])
def test_exact_posterior_makes_every_bound_tight(num_samples, max_batch):
    # Chunked K with a small max_batch: x must stay aligned with its own z in every chunk.
    model, prior = LinearGaussian(), StandardNormal(D)
    x = model.sample_x(32, seed=1)
    truth = model.log_marginal(x)
    iw, el = bounds(model, prior, x, num_samples, generator=gen(), max_batch=max_batch)
    assert iw.shape == el.shape == (32,) and iw.dtype == torch.float64
    torch.testing.assert_close(iw, truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(el, truth, rtol=0, atol=1e-9)


def test_iw_bound_dominates_elbo_and_grows_with_k():
    model, prior = LinearGaussian(mean_scale=0.5, var_scale=3.0), StandardNormal(D)
    x = model.sample_x(400, seed=2)
    truth = model.log_marginal(x)
    iw, el = bounds(model, prior, x, 10, generator=gen(1))
    assert (iw >= el - 1e-12).all()  # Jensen, per example, on the same draws
    # Burda et al. Thm 1: E L_1 <= E L_10 <= E L_100 <= log p(x). Paired per-example
    # differences, independent draws, 5-SE margins.
    l1 = iw_bound(model, prior, x, 1, generator=gen(2))
    l10 = iw_bound(model, prior, x, 10, generator=gen(3))
    l100 = iw_bound(model, prior, x, 100, generator=gen(4))

    def mean_se(v):
        return float(v.mean()), float(v.std() / math.sqrt(v.numel()))

    for lo, hi in [(l1, l10), (l10, l100)]:
        m, se = mean_se(hi - lo)
        assert m > 5 * se
    m, se = mean_se(l100 - truth)
    assert m < 5 * se
    # The ELBO with one sample is L_1.
    torch.testing.assert_close(elbo(model, prior, x, 1, generator=gen(9)),
                               iw_bound(model, prior, x, 1, generator=gen(9)))


def test_unnormalized_prior_needs_and_uses_log_normalizer():
    model = LinearGaussian(mean_scale=0.8)
    x = model.sample_x(50, seed=3)
    shifted = ShiftedNormal(D)
    with pytest.raises(ConfigError, match="unnormalized"):
        iw_bound(model, shifted, x, 5)
    with pytest.raises(ConfigError, match="normalized prior"):
        iw_bound(model, StandardNormal(D), x, 5, (0.0, 0.0))
    log_z = (ShiftedNormal.shift, 0.1)
    got = iw_bound(model, shifted, x, 20, log_z, generator=gen(5))
    ref = iw_bound(model, StandardNormal(D), x, 20, generator=gen(5))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    # log Z's SE is shared by every example: it adds in quadrature to the SE of the mean.
    summary = summarize_bound(got, 20, log_z)
    se_data = float(got.std() / math.sqrt(50))
    assert summary.se_data == pytest.approx(se_data)
    assert summary.se == pytest.approx(math.sqrt(se_data**2 + 0.1**2))
    assert summary.mean == pytest.approx(float(got.mean()))


def test_evaluate_likelihood_over_batches():
    model, prior = LinearGaussian(), StandardNormal(D)
    x = model.sample_x(70, seed=4)
    res = evaluate_likelihood(model, prior, x, num_samples=3, batch_size=16)
    truth = model.log_marginal(x)
    assert res.iw.num_examples == 70 and res.iw.num_samples == 3
    assert res.iw.mean == pytest.approx(float(truth.mean()), abs=1e-9)
    assert res.elbo.mean == pytest.approx(float(truth.mean()), abs=1e-9)
    assert res.iw.se_log_normalizer == 0.0
    assert set(res.to_dict()["iw"]) >= {"mean", "se", "se_data", "num_examples"}
    assert model.training  # the evaluation restored the module's mode


def test_non_finite_weights_raise():
    class Broken(LinearGaussian):
        def decode(self, z):
            return torch.full((z.shape[0], 1, 1, P), float("nan"), dtype=z.dtype)

    with pytest.raises(NonFiniteError, match="NaN"):
        iw_bound(Broken(), StandardNormal(D), LinearGaussian().sample_x(4, seed=0), 2)
    with pytest.raises(ConfigError, match="num_samples"):
        iw_bound(LinearGaussian(), StandardNormal(D), np.zeros(1), 0)
