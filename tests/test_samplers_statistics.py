"""Statistical tests of the samplers against the closed forms of docs/math.md §4 and docs/samplers.md §8.

Method: N = 20000 independent chains in float64 (the chains are the batch dimension), fixed
generator seeds; the final states are i.i.d. draws of the sampler's law after T steps, so moments
are tested with standardized errors |z| < 5, SE(mean) = s / sqrt(N),
SE(var) = s^2 sqrt(2 / (N - 1)) for Gaussian laws, and the empirical SE of the per-draw statistic
otherwise. Where a wrong answer is the natural mistake (ULA's variance read as s^2, MALA without
its q-correction), the same test is shown to reject it.
"""

from __future__ import annotations

import math

import pytest
import torch
from ncpvae_plugins.langevin import LangevinSampler
from ncpvae_plugins.sgld import MinibatchEnergy, SGLDSampler
from ncpvae_plugins.sir import SIRSampler
from torch import Tensor

from ncpvae.component import BuildContext
from ncpvae.mcmc.targets import posterior_energy
from ncpvae.model import LatentModel
from ncpvae.prior import Prior

N = 20000
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Elementwise work on 20k chains: one thread is faster than two fighting over a busy box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def z_mean(x: Tensor, mu: float, var: float) -> float:
    return (float(x.mean()) - mu) / math.sqrt(var / x.numel())


def z_var(x: Tensor, var: float) -> float:
    """Standardized error of the sample variance of Gaussian draws x against ``var``."""
    n = x.numel()
    return (float(x.var()) - var) / (var * math.sqrt(2 / (n - 1)))


def z_stat(values: Tensor, expected: float) -> float:
    """Standardized error of the mean of per-draw statistics (empirical SE)."""
    return (float(values.mean()) - expected) / float(values.std() / math.sqrt(values.numel()))


def final_states(sampler, energy, z0: Tensor, steps: int, seed: int) -> Tensor:
    """The final state of every chain, ``(N, D)``, keeping only that state."""
    result = sampler.run(energy, z0, steps, burn_in=steps - 1, generator=gen(seed))
    assert result.samples.shape[0] == 1
    return result.samples[-1]


def gaussian_energy(mu: float, s: float):
    return lambda z: 0.5 * (((z - mu) / s) ** 2).sum(-1)


def ula(step_size: float) -> LangevinSampler:
    return LangevinSampler.from_config(LangevinSampler.Config(step_size=step_size), BuildContext())


def mala(step_size: float) -> LangevinSampler:
    cfg = LangevinSampler.Config(step_size=step_size, metropolis=True)
    return LangevinSampler.from_config(cfg, BuildContext())


class MALAWithoutCorrection(LangevinSampler):
    """A deliberately wrong MALA: Metropolis ratio pi(z')/pi(z) without the q terms."""

    _correct_proposal = False


def sgld(**fields) -> SGLDSampler:
    return SGLDSampler.from_config(SGLDSampler.Config(**fields), BuildContext())


# ---------------------------------------------------------------------------------------------
# ULA


def test_ula_exact_law_from_a_point():
    mu, s, eps, x0, steps = 1.0, 2.0, 1.0, 3.0, 5
    a = 1 - eps / s**2
    v_inf = s**2 / (1 - eps / (2 * s**2))
    mean_t = mu + a**steps * (x0 - mu)
    var_t = v_inf * (1 - a ** (2 * steps))
    x = final_states(ula(eps), gaussian_energy(mu, s), torch.full((N, 1), x0, dtype=F64),
                     steps, seed=1)[:, 0]
    assert abs(z_mean(x, mean_t, var_t)) < 5
    assert abs(z_var(x, var_t)) < 5
    # the law is Gaussian: its standardized fourth moment is 3 (SE from the empirical spread)
    assert abs(z_stat(((x - mean_t) / math.sqrt(var_t)) ** 4, 3.0)) < 5


def test_ula_stationary_variance_is_inflated():
    mu, s, eps = -0.5, 2.0, 1.0
    v_inf = s**2 / (1 - eps / (2 * s**2))  # 4.571..., not s^2 = 4
    x = final_states(ula(eps), gaussian_energy(mu, s), torch.full((N, 1), mu, dtype=F64),
                     120, seed=2)[:, 0]  # a^240 ~ 1e-30: stationary
    assert abs(z_mean(x, mu, v_inf)) < 5
    assert abs(z_var(x, v_inf)) < 5
    assert abs(z_var(x, s**2)) > 5  # the naive answer is rejected at this N


def test_ula_multivariate_stationary_covariance():
    mu = torch.tensor([1.0, -1.0], dtype=F64)
    sigma = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F64)
    prec = torch.linalg.inv(sigma)
    eps = 0.4

    def energy(z):
        d = z - mu
        return 0.5 * ((d @ prec) * d).sum(-1)

    cov = sigma @ torch.linalg.inv(torch.eye(2, dtype=F64) - eps / 2 * prec)
    x = final_states(ula(eps), energy, mu.expand(N, 2).clone(), 200, seed=3)
    d = x - x.mean(0)
    emp = d.T @ d / (N - 1)
    for i in range(2):
        assert abs(z_mean(x[:, i], float(mu[i]), float(cov[i, i]))) < 5
        for j in range(2):
            se = math.sqrt(float(cov[i, i] * cov[j, j] + cov[i, j] ** 2) / N)
            assert abs(float(emp[i, j] - cov[i, j]) / se) < 5, (i, j)
    se_naive = math.sqrt(float(sigma[1, 1] ** 2 * 2) / N)
    assert abs(float(emp[1, 1] - sigma[1, 1]) / se_naive) > 5


# ---------------------------------------------------------------------------------------------
# MALA


def test_mala_is_exact_and_the_uncorrected_variant_is_rejected():
    mu, s, eps, x0, steps = 1.0, 1.5, 1.0, 4.0, 150
    energy = gaussian_energy(mu, s)
    z0 = torch.full((N, 1), x0, dtype=F64)
    x = final_states(mala(eps), energy, z0, steps, seed=4)[:, 0]
    assert abs(z_mean(x, mu, s**2)) < 5
    assert abs(z_var(x, s**2)) < 5
    wrong = MALAWithoutCorrection.from_config(
        LangevinSampler.Config(step_size=eps, metropolis=True), BuildContext())
    y = final_states(wrong, energy, z0, steps, seed=4)[:, 0]
    assert abs(z_var(y, s**2)) > 5


@pytest.mark.slow
def test_mala_on_the_banana():
    # x1 ~ N(0, a^2), x2 | x1 ~ N(b (x1^2 - a^2), 1): Var x2 = 1 + 2 b^2 a^4, E[x1^2 x2] = 2 b a^4
    a, b = 1.0, 0.5

    def energy(z):
        x1, x2 = z[:, 0], z[:, 1]
        return 0.5 * (x1 / a) ** 2 + 0.5 * (x2 - b * (x1**2 - a**2)) ** 2

    z0 = torch.randn(N, 2, generator=gen(50), dtype=F64)
    x = final_states(mala(0.5), energy, z0, 400, seed=5)
    x1, x2 = x[:, 0], x[:, 1]
    assert abs(z_stat(x1, 0.0)) < 5
    assert abs(z_stat(x2, 0.0)) < 5
    assert abs(z_stat(x1**2, a**2)) < 5
    assert abs(z_stat((x2 - x2.mean()) ** 2, 1 + 2 * b**2 * a**4)) < 5
    assert abs(z_stat(x1**2 * x2, 2 * b * a**4)) < 5


# ---------------------------------------------------------------------------------------------
# SGLD (constant step: gamma = 0, eps_t = a)


def test_sgld_with_gradient_noise_has_the_closed_form_variance():
    mu, s, eps, sg = 0.5, 1.0, 0.2, 2.0
    noise = gen(60)

    def noisy_energy(z):  # gradient (z - mu)/s^2 + sg * xi, xi ~ N(0, 1) fresh per call/chain
        xi = torch.randn(z.shape, generator=noise, dtype=z.dtype)
        return (0.5 * ((z - mu) / s) ** 2 + sg * xi * z).sum(-1)

    v_inf = s**2 * (1 + eps * sg**2 / 2) / (1 - eps / (2 * s**2))
    v_ula = s**2 / (1 - eps / (2 * s**2))
    x = final_states(sgld(a=eps, gamma=0.0), noisy_energy, torch.full((N, 1), mu, dtype=F64),
                     100, seed=6)[:, 0]
    assert abs(z_mean(x, mu, v_inf)) < 5
    assert abs(z_var(x, v_inf)) < 5
    assert abs(z_var(x, v_ula)) > 5  # gradient noise matters


def test_temperature_multiplies_the_variance():
    mu, s, eps, temperature = 0.0, 1.0, 0.3, 2.5
    v = temperature * s**2 / (1 - eps / (2 * s**2))
    x = final_states(sgld(a=eps, gamma=0.0, temperature=temperature), gaussian_energy(mu, s),
                     torch.zeros(N, 1, dtype=F64), 100, seed=7)[:, 0]
    assert abs(z_var(x, v)) < 5
    assert abs(z_var(x, v / temperature)) > 5


def test_sgld_on_a_minibatch_posterior():
    # x_i ~ N(theta, 1), prior N(0, 1): posterior N(N xbar / (N + 1), 1 / (N + 1)). Per-chain
    # minibatches of n with replacement add gradient noise sg^2 = N^2 pop_var / n.
    data = 0.7 + torch.randn(100, 1, generator=gen(70), dtype=F64)
    num, n = data.shape[0], 10
    xbar = float(data.mean())
    pop_var = float(((data - xbar) ** 2).mean())
    s2 = 1 / (num + 1)
    mu = num * xbar / (num + 1)
    sg2 = num**2 * pop_var / n
    eps = 0.005

    def nll(z, batch):
        return 0.5 * ((batch - z.unsqueeze(1)) ** 2).sum(-1)

    energy = MinibatchEnergy(nll, data, n, prior_energy=lambda z: 0.5 * (z**2).sum(-1),
                             generator=gen(71))
    v_inf = s2 * (1 + eps * sg2 / 2) / (1 - eps / (2 * s2))
    x = final_states(sgld(a=eps, gamma=0.0), energy, torch.zeros(N, 1, dtype=F64), 100,
                     seed=8)[:, 0]
    assert abs(z_mean(x, mu, v_inf)) < 5
    assert abs(z_var(x, v_inf)) < 5
    assert abs(z_var(x, s2)) > 5


# ---------------------------------------------------------------------------------------------
# SIR on the quadratic-logit NCP case


class QuadraticLogitPrior(Prior):
    """N(0, I) reweighted by exp f, f(z) = b·z - z·Az/2: exactly N(m, C), C = (I + A)^-1."""

    name = "quadratic_logit_test"

    def __init__(self, b: Tensor, A: Tensor, base: Prior):
        super().__init__(b.shape[0])
        self.b, self.A, self._base = b, A, base

    def logit(self, z: Tensor) -> Tensor:
        return z @ self.b - 0.5 * ((z @ self.A) * z).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:  # unnormalized
        return self._base.log_prob(z) + self.logit(z)

    def sample(self, n, *, generator=None):
        raise NotImplementedError

    @property
    def base_prior(self) -> Prior:
        return self._base


class StandardNormal(Prior):
    name = "standard_normal_test"

    def log_prob(self, z):
        return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, n, *, generator=None):
        return torch.randn(n, self.latent_dim, generator=generator, dtype=F64)


def log_z_quadratic(b: Tensor, A: Tensor) -> float:
    m = torch.eye(b.shape[0], dtype=F64) + A
    return float(-0.5 * torch.logdet(m) + 0.5 * b @ torch.linalg.solve(m, b))


def test_sir_on_the_quadratic_logit_ncp():
    b = torch.tensor([0.8, -0.5], dtype=F64)
    A = torch.tensor([[0.6, 0.2], [0.2, 0.3]], dtype=F64)
    prior = QuadraticLogitPrior(b, A, StandardNormal(2))
    cov = torch.linalg.inv(torch.eye(2, dtype=F64) + A)
    m = cov @ b
    sampler = SIRSampler.from_config(SIRSampler.Config(num_candidates=50), BuildContext())
    result = sampler.sample_prior(prior, N, generator=gen(9))
    x = result.samples[-1]
    diag = result.diagnostics
    pool_ess = diag["ess"]
    for i in range(2):
        # resampling noise (N draws) plus the pool's own importance-sampling noise
        var = float(cov[i, i]) * (1 + N / pool_ess)
        assert abs(z_mean(x[:, i], float(m[i]), var)) < 5
        assert abs(z_stat((x[:, i] - m[i]) ** 2, float(cov[i, i])) /
                   math.sqrt(1 + N / pool_ess)) < 5
    # ESS fraction vs Z(f)^2 / Z(2f)
    expected = math.exp(2 * log_z_quadratic(b, A) - log_z_quadratic(2 * b, 2 * A))
    g = gen(10)
    pool = torch.randn(diag["num_candidates"], 2, generator=g, dtype=F64)
    w = torch.exp(prior.logit(pool))  # same law as the sampler's weights; SE by the delta method
    m1, m2 = w.mean(), (w**2).mean()
    grad = torch.stack([2 * m1 / m2, -(m1**2) / m2**2])
    cov_w = torch.cov(torch.stack([w, w**2])) / w.numel()
    se = float(torch.sqrt(grad @ cov_w @ grad))
    assert abs((diag["ess_fraction"] - expected) / se) < 5
    # log-mean-weight estimates log Z(f) (the test prior's log_prob omits the normalizer)
    assert abs(diag["log_mean_weight"] - log_z_quadratic(b, A)) < 5 * math.sqrt(
        (1 / expected - 1) / diag["num_candidates"])


def test_isir_kernel_targets_the_quadratic_logit_ncp():
    b = torch.tensor([0.8, -0.5], dtype=F64)
    A = torch.tensor([[0.6, 0.2], [0.2, 0.3]], dtype=F64)
    prior = QuadraticLogitPrior(b, A, StandardNormal(2))
    cov = torch.linalg.inv(torch.eye(2, dtype=F64) + A)
    m = cov @ b
    sampler = SIRSampler.from_config(SIRSampler.Config(num_candidates=4), BuildContext())
    # Far from the target: the kernel must move them. An independence-type kernel forgets its
    # start geometrically (here by a factor ~0.5 per step), so 12 steps leave ~1e-4 of it.
    z0 = torch.full((N, 2), 3.0, dtype=F64)
    result = sampler.run(prior.energy, z0, 12, burn_in=11, generator=gen(11),
                         proposal=prior.base_prior)
    x = result.samples[-1]
    for i in range(2):
        assert abs(z_mean(x[:, i], float(m[i]), float(cov[i, i]))) < 5
        assert abs(z_var(x[:, i], float(cov[i, i]))) < 5


# ---------------------------------------------------------------------------------------------
# latent posterior of a linear-Gaussian decoder


class LinearGaussianModel(LatentModel):
    """x = W z + c + sigma * noise on a 1x2x2 image: the posterior is Gaussian in closed form."""

    name = "linear_gaussian_test"

    def __init__(self, W: Tensor, c: Tensor, sigma: float):
        super().__init__(W.shape[1], likelihood="gaussian", gaussian_scale=sigma)
        self.W, self.c = W, c
        self.log_scale = self.log_scale.to(F64)

    def encode(self, x):
        raise NotImplementedError

    def decode(self, z):
        return (z @ self.W.T + self.c).reshape(-1, 1, 2, 2)


def test_mala_on_a_linear_gaussian_latent_posterior():
    W = torch.tensor([[0.8, 0.1], [-0.3, 0.5], [0.2, 0.9], [0.4, -0.6]], dtype=F64)
    c = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    sigma = 0.5
    model = LinearGaussianModel(W, c, sigma)
    x_img = torch.tensor([0.9, -0.1, 0.8, 0.2], dtype=F64)
    prior = StandardNormal(2)
    x = x_img.reshape(1, 1, 2, 2).expand(N, 1, 2, 2)  # chain i <-> image i (all the same here)
    energy = posterior_energy(model, prior, x)
    post_cov = torch.linalg.inv(torch.eye(2, dtype=F64) + W.T @ W / sigma**2)
    post_mean = post_cov @ W.T @ (x_img - c) / sigma**2
    z0 = torch.zeros(N, 2, dtype=F64)
    # the energy is -log p(x|z) + prior energy: check one value by hand
    z_check = torch.randn(N, 2, generator=gen(12), dtype=F64)
    resid = (x_img - c - z_check[:3] @ W.T) / sigma
    by_hand = (0.5 * resid**2).sum(-1) + 4 * (math.log(sigma) + 0.5 * math.log(2 * math.pi)) \
        - prior.log_prob(z_check[:3])
    torch.testing.assert_close(energy(z_check)[:3], by_hand)
    z = final_states(mala(0.05), energy, z0, 150, seed=13)
    for i in range(2):
        assert abs(z_mean(z[:, i], float(post_mean[i]), float(post_cov[i, i]))) < 5
        assert abs(z_var(z[:, i], float(post_cov[i, i]))) < 5
