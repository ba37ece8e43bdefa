"""The network priors of issue 23: ``diffusion``, ``two_stage``, ``made``, and NCP over each.

Closed forms: on Gaussian data the optimal noise predictor of the VP SDE is linear,
``eps*(x, t) = s_t (alpha_t^2 C + s_t^2 I)^{-1} x``, so the ODE log density through it is known
exactly (``N(0, alpha_tmin^2 C + s_tmin^2 I)``); statistical checks use 5 standard errors.
"""

from __future__ import annotations

import pytest
import torch
from helpers.priors import exact_latents, gen, mean_se, one_thread  # noqa: F401 (fixture)
from ncpvae_plugins.diffusion import DiffusionPrior
from ncpvae_plugins.gaussian import GaussianPrior
from ncpvae_plugins.made import MADEPrior
from ncpvae_plugins.ncp import NCPPrior
from ncpvae_plugins.two_stage import TwoStagePrior
from torch import Tensor, nn

import ncpvae
from ncpvae.errors import ConfigError, NotFittedError
from ncpvae.testing import check_prior

COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)


def gaussian_points(n: int, seed: int, mean: Tensor = MEAN, cov: Tensor = COV) -> Tensor:
    eps = torch.randn(n, len(mean), generator=gen(seed), dtype=torch.float64)
    return (mean + eps @ torch.linalg.cholesky(cov).T).float()


class GaussianNoise(nn.Module):
    """The optimal noise predictor of the VP SDE for data N(0, C)."""

    def __init__(self, cov: Tensor, prior: DiffusionPrior):
        super().__init__()
        self.register_buffer("cov", cov.float())
        self.schedule = prior.schedule

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        alpha2 = torch.exp(2 * self.schedule.log_alpha(t))[:, None, None]
        sigma = self.schedule.sigma(t)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        marginal = alpha2 * self.cov.to(x.dtype) + sigma[:, None, None] ** 2 * eye
        return sigma[:, None] * torch.linalg.solve(marginal, x.unsqueeze(-1)).squeeze(-1)


def exact_diffusion(cov: Tensor, **config) -> DiffusionPrior:
    """A diffusion prior (identity standardization) with the exact noise predictor of N(0, cov)."""
    prior = DiffusionPrior(GaussianPrior(len(cov)), DiffusionPrior.Config(**config))
    prior.net = GaussianNoise(cov, prior)
    prior.mark_fitted()
    return prior


def ode_target(prior: DiffusionPrior, cov: Tensor, z: Tensor) -> Tensor:
    """``log N(z; 0, alpha_tmin^2 C + s_tmin^2 I)``: what the ODE from ``t_min`` computes."""
    t = torch.tensor(prior.config.t_min, dtype=torch.float64)
    alpha2 = float(torch.exp(2 * prior.schedule.log_alpha(t)))
    sigma2 = float(prior.schedule.sigma(t)) ** 2
    marginal = alpha2 * cov + sigma2 * torch.eye(len(cov), dtype=torch.float64)
    return torch.distributions.MultivariateNormal(torch.zeros(len(cov), dtype=torch.float64),
                                                  marginal).log_prob(z.double())


# ---------------------------------------------------------------------------------------------
# diffusion: the ODE and the samplers through the exact score


def test_ode_log_density_of_a_standard_normal_is_the_analytic_one():
    prior = exact_diffusion(torch.eye(3, dtype=torch.float64), ode_steps=4)
    z = torch.randn(50, 3, generator=gen(0))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z.double()).sum(-1)
    with torch.no_grad():
        assert torch.allclose(prior.log_prob(z).double(), expected, atol=1e-5)


def test_ode_log_density_through_the_exact_score_converges_with_the_steps():
    """RK4's error falls with the step count (the table of docs/priors.md §10)."""
    z = gaussian_points(200, 1, torch.zeros(2, dtype=torch.float64)).double()
    errors = []
    for steps in (2, 8, 32):  # in float64: float32 rounding is ~1e-4 nats
        prior = exact_diffusion(COV, ode_steps=steps).double()
        with torch.no_grad():
            errors.append(float((prior.log_prob(z) - ode_target(prior, COV, z)).abs().max()))
    assert errors[2] < errors[1] < errors[0]
    # 32 steps (the default): below a thousandth of a nat per point (measured 2e-4, most of it
    # the N(0, I) terminal's alpha_1^2 error)
    assert errors[2] < 1e-3


def test_hutchinson_divergence_is_exact_for_a_diagonal_jacobian():
    cov = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    z = gaussian_points(100, 2, torch.zeros(2, dtype=torch.float64), cov)
    exact = exact_diffusion(cov, ode_steps=16)
    probe = exact_diffusion(cov, ode_steps=16, divergence="hutchinson", probes=1)
    with torch.no_grad():
        assert torch.allclose(probe.log_prob(z), exact.log_prob(z), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_samplers_through_the_exact_score_match_the_covariance(sampler):
    prior = exact_diffusion(COV, sampler=sampler, ode_steps=32, sde_steps=400)
    draws = prior.sample(4000, generator=gen(3)).double()
    for i, j in ((0, 0), (0, 1), (1, 1)):
        products = draws[:, i] * draws[:, j]
        value, se = mean_se(products)
        assert abs(value - float(COV[i, j])) < 5 * se, (sampler, i, j, value)
    for i in range(2):
        value, se = mean_se(draws[:, i])
        assert abs(value) < 5 * se


def test_diffusion_energy_gradient_is_minus_the_score_of_the_ode_density():
    """The gradient of the ODE log density (through the solver) of N(0, C) is -C_t^{-1} z."""
    prior = exact_diffusion(COV, ode_steps=16)
    z = gaussian_points(5, 4, torch.zeros(2, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(prior.energy(z).sum(), z)
    t = torch.tensor(prior.config.t_min, dtype=torch.float64)
    alpha2 = float(torch.exp(2 * prior.schedule.log_alpha(t)))
    marginal = alpha2 * COV + float(prior.schedule.sigma(t)) ** 2 * torch.eye(2, dtype=torch.float64)
    expected = torch.linalg.solve(marginal, z.detach().double().T).T
    assert torch.allclose(grad.double(), expected, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# fitted priors on a correlated Gaussian


@pytest.fixture(scope="module")
def fitted() -> dict[str, ncpvae.Prior]:
    points = gaussian_points(6000, 5)
    configs = {"diffusion": DiffusionPrior.Config(epochs=150, patience=30, hidden=[64, 64]),
               "two_stage": TwoStagePrior.Config(epochs=60, hidden=[64, 64], iw_samples=128),
               "made": MADEPrior.Config(epochs=60, hidden=[64, 64])}
    classes = {"diffusion": DiffusionPrior, "two_stage": TwoStagePrior, "made": MADEPrior}
    out = {}
    for name, config in configs.items():
        prior = classes[name](GaussianPrior(2), config, seed=0)
        prior.fit(*exact_latents(points), generator=gen(6))
        out[name] = prior
    return out


@pytest.mark.slow  # fits a score model
def test_learned_noise_predictor_matches_the_linear_optimum(fitted):
    prior = fitted["diffusion"]
    assert isinstance(prior, DiffusionPrior)
    corr = COV / torch.outer(COV.diag().sqrt(), COV.diag().sqrt())  # the standardized data
    optimum = GaussianNoise(corr, prior)
    x0 = gaussian_points(4000, 7, torch.zeros(2, dtype=torch.float64), corr)
    t = 0.02 + 0.98 * torch.rand(4000, generator=gen(8))
    alpha = torch.exp(prior.schedule.log_alpha(t))[:, None]
    xt = alpha * x0 + prior.schedule.sigma(t)[:, None] * torch.randn(4000, 2, generator=gen(9))
    with torch.no_grad():
        learned, best = prior.net(xt, t), optimum(xt, t)
    relative = float(((learned - best) ** 2).sum() / (best**2).sum())
    assert relative < 0.02  # measured ~0.003 at these settings


@pytest.mark.slow  # fits three priors
@pytest.mark.parametrize("name", ["diffusion", "two_stage", "made"])
def test_fitted_cross_entropy_is_the_gaussian_entropy(fitted, name):
    """Held-out -log p matches -log N (a fitted density: within 0.05 nats, measured 0.005-0.03)."""
    prior = fitted[name]
    z = gaussian_points(3000, 10)
    truth = torch.distributions.MultivariateNormal(MEAN, COV).log_prob(z.double())
    with torch.no_grad():
        gap, _ = mean_se(truth - prior.log_prob(z).double())
    assert -0.02 < gap < 0.05  # KL(q || p) >= 0, up to Monte Carlo and the bound's error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusion", "two_stage", "made"])
def test_sampling_moments_match_the_data(fitted, name):
    draws = fitted[name].sample(4000, generator=gen(11)).double()
    centred = draws - MEAN
    for i in range(2):
        value, se = mean_se(draws[:, i])
        assert abs(value - float(MEAN[i])) < 5 * se + 0.02, (name, i)
    for i, j in ((0, 0), (0, 1), (1, 1)):
        value, se = mean_se(centred[:, i] * centred[:, j])
        assert abs(value - float(COV[i, j])) < 5 * se + 0.03, (name, i, j)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_stage", "made"])
def test_density_integrates_to_one_on_a_grid(fitted, name):
    prior = fitted[name]
    axis = torch.linspace(-5.0, 7.0, 241)
    cell = float(axis[1] - axis[0]) ** 2
    grid = torch.stack(torch.meshgrid(axis - 1.0, axis - 1.5, indexing="ij"), -1)  # covers MEAN
    with torch.no_grad():
        mass = float(prior.log_prob(grid).double().exp().sum() * cell)
    low = 0.97 if name == "two_stage" else 0.99  # the IW bound is low by its gap in expectation
    assert low < mass < 1.01, mass


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusion", "two_stage", "made"])
def test_contract_state_dict_and_registry(fitted, name):
    prior = fitted[name]
    check_prior(prior)
    same = {"iw_samples": 128} if name == "two_stage" else {}  # the buffer's shape
    fresh = ncpvae.create("prior", name, latent_dim=2, hidden=[64, 64], seed=3, **same)
    assert not fresh.is_fitted
    with pytest.raises(NotFittedError):
        fresh.sample(2)
    fresh.load_state_dict(prior.state_dict())
    z = torch.randn(7, 2, generator=gen(12))
    with torch.no_grad():
        assert torch.equal(fresh.log_prob(z), prior.log_prob(z))


@pytest.mark.slow  # shares the fitted priors
def test_two_stage_reports_the_estimate_and_its_se(fitted):
    prior = fitted["two_stage"]
    assert isinstance(prior, TwoStagePrior)
    assert not prior.normalized and "IW estimate" in prior.label
    log_z, se = prior.log_normalizer(generator=gen(13))
    assert log_z == 0.0 and 0.0 < se < 0.1
    # the estimate is a deterministic function of z (fixed importance draws)
    z = torch.randn(5, 2, generator=gen(14))
    with torch.no_grad():
        assert torch.equal(prior.log_prob(z), prior.log_prob(z.clone()))


def test_bad_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="beta_max"):
        DiffusionPrior(GaussianPrior(2), DiffusionPrior.Config(beta_min=5.0, beta_max=1.0))
    with pytest.raises(ConfigError):
        ncpvae.create("prior", "made", latent_dim=2, components=0)


# ---------------------------------------------------------------------------------------------
# NCP over each base


class LinearTilt(nn.Module):
    """``f(z) = b.z + c``, starting at zero."""

    def __init__(self, dim: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(dim))
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.b + self.c


@pytest.mark.slow  # fits two bases and three classifiers
@pytest.mark.parametrize("name", ["diffusion", "two_stage", "made"])
def test_ncp_over_each_base_recovers_a_known_tilt(name):
    """q = N(m, C) over a base b = N(0, C): log q / b = (C^-1 m).z + const, so the NCP's linear
    tilt recovers ``C^-1 m``. The two_stage and made bases are fitted on draws of N(0, I)
    (C = I, up to their fit); the diffusion base is the exact score of N(0, C) with a diagonal
    C (its ODE samples and density then are N(0, C) up to the solver), so the tilt is known
    exactly through the ODE."""
    shift = torch.tensor([0.6, -0.4], dtype=torch.float64)
    if name == "diffusion":
        cov = torch.diag(torch.tensor([1.5, 0.7], dtype=torch.float64))
        base = exact_diffusion(cov)
    else:
        cov = torch.eye(2, dtype=torch.float64)
        base = ncpvae.create("prior", name, latent_dim=2, hidden=[64, 64], epochs=40)
        base.fit(*exact_latents(gaussian_points(6000, 20, torch.zeros(2, dtype=torch.float64),
                                                cov)), generator=gen(21))
    ncp = NCPPrior(base, NCPPrior.Config(epochs=40, lr=2e-2, batch_size=1000, fit_base=False,
                                         log_z_samples=20_000), classifier=LinearTilt(2))
    ncp.fit(*exact_latents(gaussian_points(8000, 22, shift, cov)), generator=gen(23))
    expected = torch.linalg.solve(cov, shift).float()
    assert torch.allclose(ncp.classifier.b.detach(), expected, atol=0.1), ncp.classifier.b
    assert ncp.label == f"NCP over {base.label}"
    log_z, se = ncp.log_normalizer(generator=gen(24))
    over_base, se_over = ncp.log_normalizer_over_base(generator=gen(24))
    if name == "two_stage":  # the base's Monte Carlo SE is carried into the NCP's log Z
        assert se > se_over
    else:
        assert se == se_over and log_z == over_base
    check_prior(ncp)
