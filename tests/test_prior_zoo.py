"""The learned priors beyond NCP (gmm, flow, ebm, vamp) and NCP over any base.

Statistical checks compare Monte Carlo estimates with closed forms, with tolerances of 5
standard errors of the estimate (fixed seeds); the fits are sized so that their own error is
well below that.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.priors import exact_latents, gen, mean_se, one_thread  # noqa: F401 (fixture)
from ncpvae_plugins.ebm import EBMPrior
from ncpvae_plugins.flow import FlowPrior
from ncpvae_plugins.gaussian import GaussianPrior
from ncpvae_plugins.gmm import GMMPrior
from ncpvae_plugins.ncp import NCPPrior
from torch import Tensor, nn

import ncpvae
from ncpvae.errors import ConfigError, NotFittedError
from ncpvae.testing import check_prior

LOG_2PI = math.log(2 * math.pi)


def mvn_log_prob(z: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    return torch.distributions.MultivariateNormal(mean.double(), cov.double()).log_prob(z.double())


def assert_round_trip(prior: ncpvae.Prior, fresh: ncpvae.Prior, z: Tensor) -> None:
    """The state dict restores an identical density in a freshly built prior."""
    state = prior.state_dict()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_prob(z), prior.log_prob(z))


# ---------------------------------------------------------------------------------------------
# gmm


class ThreeComponents:
    """A known 3-component mixture in 2-D."""

    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    covs = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 0.8]],
                         [[0.3, -0.1], [-0.1, 0.3]]], dtype=torch.float64)

    @classmethod
    def sample(cls, n: int, g: torch.Generator) -> Tensor:
        which = torch.multinomial(cls.weights, n, replacement=True, generator=g)
        tril = torch.linalg.cholesky(cls.covs)
        eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
        return cls.means[which] + (tril[which] @ eps.unsqueeze(-1)).squeeze(-1)

    @classmethod
    def log_prob(cls, z: Tensor) -> Tensor:
        comps = torch.stack([mvn_log_prob(z, m, c) for m, c in zip(cls.means, cls.covs,
                                                                     strict=True)], -1)
        return torch.logsumexp(comps + cls.weights.log(), -1)


@pytest.fixture(scope="module")
def fitted_gmm() -> GMMPrior:
    prior = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=3), seed=0)
    points = ThreeComponents.sample(20_000, gen(0)).float()
    prior.fit(*exact_latents(points), generator=gen(1))
    return prior


def test_gmm_recovers_the_cross_entropy_of_a_known_mixture(fitted_gmm):
    z = ThreeComponents.sample(20_000, gen(2))
    cross_entropy, se = mean_se(-fitted_gmm.log_prob(z.float()))
    entropy, se_true = mean_se(-ThreeComponents.log_prob(z))
    # the same draws: the paired difference KL(p* || gmm) has a much smaller SE
    kl, kl_se = mean_se(-fitted_gmm.log_prob(z.float()).double() + ThreeComponents.log_prob(z))
    assert abs(cross_entropy - entropy) < 5 * math.hypot(se, se_true)
    assert abs(kl) < 5 * kl_se + 1e-3  # + the expected fit error, (#params / 2N) ~ 4e-4 nats
    assert fitted_gmm.fit_summary["converged"]


def test_gmm_diag_and_means_options_and_labels():
    points = ThreeComponents.sample(3000, gen(3)).float()
    diag = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=3, covariance="diag"),
                    seed=0)
    diag.fit(*exact_latents(points), generator=gen(4))
    assert diag.label == "GMM (K=3, diag)"
    check_prior(diag)
    # fitted on the means of wide posteriors, the mixture ignores the posterior spread
    on_means = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=1, covariance="full",
                                                          fit_on="means"), seed=0)
    on_means.fit(torch.zeros(500, 2), torch.zeros(500, 2), generator=gen(5))
    assert float(on_means.scale_tril.diagonal(dim1=-2, dim2=-1).max()) < 1e-2
    on_draws = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=1, covariance="full"),
                        seed=0)
    on_draws.fit(torch.zeros(4000, 2), torch.zeros(4000, 2), generator=gen(5))
    scale = on_draws.scale_tril.diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(scale, torch.ones(2), atol=5 * 0.5 / math.sqrt(4000) * 2)


def test_gmm_contract_state_dict_and_errors(fitted_gmm):
    check_prior(fitted_gmm)
    z = torch.randn(7, 2, generator=gen(6))
    fresh = ncpvae.create("prior", "gmm", latent_dim=2, components=3)
    with pytest.raises(NotFittedError, match="gmm"):
        fresh.log_prob(z)
    assert_round_trip(fitted_gmm, fresh, z)
    assert fresh.is_fitted
    # exact sampling: the sample mean matches the mixture mean
    draws = fitted_gmm.sample(20_000, generator=gen(7)).double()
    true_mean = (ThreeComponents.weights[:, None] * ThreeComponents.means).sum(0)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - true_mean).abs() < 5 * se + 0.02).all()
    # the gain over N(0, I) is the mean log ratio (a normalized prior: log Z = 0)
    delta, se = fitted_gmm.kl_gain(z)
    expected = fitted_gmm.log_prob(z) - GaussianPrior(2).log_prob(z)
    assert delta == pytest.approx(float(expected.double().mean()), rel=1e-6)
    with pytest.raises(ConfigError, match="components"):
        GMMPrior(GaussianPrior(2), GMMPrior.Config(components=50)).fit(torch.zeros(10, 2),
                                                                       torch.zeros(10, 2))


# ---------------------------------------------------------------------------------------------
# flow

FLOW_MEAN = torch.tensor([1.0, -2.0])
FLOW_COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]]) * 0.25


@pytest.fixture(scope="module", params=["maf", "nsf"])
def fitted_flow(request) -> FlowPrior:
    prior = ncpvae.create("prior", "flow", latent_dim=2, flow_type=request.param, transforms=2,
                          hidden=[32, 32], epochs=40, batch_size=256, lr=3e-3, patience=8,
                          seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        points = torch.distributions.MultivariateNormal(FLOW_MEAN, FLOW_COV).sample((8000,))
    prior.fit(*exact_latents(points), generator=gen(8))
    return prior


@pytest.mark.slow  # statistical; fits two flows
def test_flow_reaches_the_entropy_of_a_correlated_gaussian(fitted_flow):
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * FLOW_COV.double()))
    with torch.random.fork_rng():
        torch.manual_seed(9)
        z = torch.distributions.MultivariateNormal(FLOW_MEAN, FLOW_COV).sample((20_000,))
    with torch.no_grad():
        cross_entropy, se = mean_se(-fitted_flow.log_prob(z))
        assert abs(cross_entropy - entropy) < 5 * se
        # sampling and log_prob agree: -log p over its own samples is its cross-entropy
        own = fitted_flow.sample(20_000, generator=gen(10))
        own_entropy, own_se = mean_se(-fitted_flow.log_prob(own))
    assert abs(own_entropy - cross_entropy) < 5 * math.hypot(se, own_se)
    assert fitted_flow.fit_summary["epochs_run"] >= fitted_flow.fit_summary["best_epoch"] >= 1


@pytest.mark.slow  # shares the fitted flows
def test_flow_contract_and_state_dict(fitted_flow):
    check_prior(fitted_flow)
    z = torch.randn(5, 2, generator=gen(11))
    fresh = ncpvae.create("prior", "flow", latent_dim=2, flow_type=fitted_flow.config.flow_type,
                          transforms=2,
                          hidden=[32, 32], seed=1)
    assert_round_trip(fitted_flow, fresh, z)
    assert fresh.label == f"flow ({fitted_flow.config.flow_type.upper()})"


# ---------------------------------------------------------------------------------------------
# ebm


class QuadraticTilt(nn.Module):
    """``f(z) = b.z - sum_j a_j z_j^2 / 2`` (a diagonal quadratic, starting at zero)."""

    def __init__(self, dim: int):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(dim))
        self.a = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.b - 0.5 * (z**2 * self.a).sum(-1)


EBM_MEAN = torch.tensor([1.0, -0.5])
EBM_VAR = torch.tensor([0.5, 1.25])


def tilted_gaussian_log_z(b: Tensor, a: Tensor) -> float:
    """docs/math.md §4 for a diagonal A on base N(0, I)."""
    precision = 1 + a.double()
    return float((-0.5 * precision.log() + 0.5 * b.double() ** 2 / precision).sum())


@pytest.fixture(scope="module")
def fitted_ebm() -> EBMPrior:
    # persistent MALA chains (PCD): a few steps per update suffice once the chains are mixed
    config = EBMPrior.Config(epochs=25, batch_size=1000, lr=2e-2, langevin_steps=10,
                             step_size=0.1, metropolis=True, persistent=True,
                             reinit_fraction=0.0, patience=25, heldout_log_z_samples=20_000,
                             log_z_samples=200_000)
    prior = EBMPrior(GaussianPrior(2), config, energy_net=QuadraticTilt(2), seed=0)
    n = 20_000
    mu = EBM_MEAN.expand(n, 2).clone()
    logvar = EBM_VAR.log().expand(n, 2).clone()
    prior.fit(mu, logvar, generator=gen(12))
    return prior


#: How far a maximum-likelihood fit by Adam with Langevin negatives may land from the optimum
#: (measured: 0.01-0.03 in the means and log Z, a few % in the variances, at these settings);
#: the Monte Carlo checks against the fitted model's own closed forms use 5 SE alone.
EBM_FIT_SLACK = 0.05


@pytest.mark.slow  # statistical; fits an EBM
def test_ebm_recovers_log_z_and_the_tilted_moments(fitted_ebm):
    truth_b, truth_a = EBM_MEAN / EBM_VAR, 1 / EBM_VAR - 1
    fit_b, fit_a = fitted_ebm.classifier.b.detach(), fitted_ebm.classifier.a.detach()
    log_z, se = fitted_ebm.log_normalizer(generator=gen(13))
    assert abs(log_z - tilted_gaussian_log_z(fit_b, fit_a)) < 5 * se  # the estimator
    assert abs(log_z - tilted_gaussian_log_z(truth_b, truth_a)) < 5 * se + EBM_FIT_SLACK
    fit_var = 1 / (1 + fit_a.double())
    assert ((fit_var - EBM_VAR.double()).abs() < 2 * EBM_FIT_SLACK * EBM_VAR.double()).all()
    assert ((fit_b.double() * fit_var - EBM_MEAN.double()).abs() < EBM_FIT_SLACK).all()
    draws = fitted_ebm.sample(20_000, generator=gen(14)).double()
    ess = fitted_ebm.sampling_info()["ess_fraction"]
    n_eff = len(draws) / (1 + 1 / (fitted_ebm.config.sir_candidates * ess))
    mean_se_ = (EBM_VAR.double() / n_eff).sqrt()
    var_se = EBM_VAR.double() * math.sqrt(2 / n_eff)
    # SIR draws have the fitted prior's moments (5 SE) and so nearly the data's
    fit_mean = fit_b.double() * fit_var
    assert ((draws.mean(0) - fit_mean).abs() < 5 * mean_se_).all()
    assert ((draws.var(0) - fit_var).abs() < 5 * var_se).all()
    assert fitted_ebm.fit_summary["heldout_gain"] > 0


@pytest.mark.slow  # shares the fitted EBM
def test_ebm_contract_state_dict_and_config(fitted_ebm):
    check_prior(fitted_ebm)
    z = torch.randn(5, 2, generator=gen(15))
    fresh = EBMPrior(GaussianPrior(2), energy_net=QuadraticTilt(2))
    assert_round_trip(fitted_ebm, fresh, z)
    built = ncpvae.create("prior", "ebm", latent_dim=3, hidden=[16], epochs=2, min_steps=0,
                          batch_size=64, langevin_steps=3, persistent=True)
    summary = built.fit(torch.randn(300, 3, generator=gen(16)), torch.zeros(300, 3),
                        generator=gen(17))
    assert summary["epochs_run"] == 2 and built.label == "EBM"
    check_prior(built)


# ---------------------------------------------------------------------------------------------
# NCP over any base


class ZeroLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> Tensor:
        return z[..., 0] * 0.0 + self.unused


def test_ncp_over_a_gmm_base_with_zero_logit_is_the_gmm(fitted_gmm):
    prior = NCPPrior(fitted_gmm, NCPPrior.Config(fit_base=False), classifier=ZeroLogit(),
                     fitted=True)
    z = torch.randn(300, 2, generator=gen(18))
    assert torch.equal(prior.log_prob(z), fitted_gmm.log_prob(z))
    assert prior.log_normalizer(1000, generator=gen(19)) == (0.0, 0.0)
    assert prior.kl_gain_over_base(z, num_samples=100) == (0.0, 0.0)
    assert prior.kl_gain(z, num_samples=100) == fitted_gmm.kl_gain(z)
    assert prior.base_prior is fitted_gmm.base_prior and prior.label.startswith("NCP over GMM")
    check_prior(prior)


def test_ncp_over_a_fitted_gaussian_base_keeps_the_closed_forms():
    # a fitted Gaussian base: a one-component GMM N(m0, S0)
    m0, s0 = torch.tensor([0.5, -1.0]), torch.tensor([[1.5, 0.4], [0.4, 0.8]])
    base = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=1))
    base.load_mixture(torch.ones(1), m0[None], s0[None])
    b, a_mat = torch.tensor([0.3, 0.6]), torch.tensor([[0.8, 0.2], [0.2, 0.5]])

    class Quadratic(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            return z @ b - 0.5 * ((z @ a_mat) * z).sum(-1)

    prior = NCPPrior(base, NCPPrior.Config(log_z_samples=200_000), classifier=Quadratic(),
                     fitted=True)
    p0 = torch.linalg.inv(s0.double())
    precision = p0 + a_mat.double()
    h = p0 @ m0.double() + b.double()
    cov = torch.linalg.inv(precision)
    mean = cov @ h
    log_z = float(-0.5 * torch.logdet(s0.double() @ precision) + 0.5 * h @ cov @ h
                  - 0.5 * m0.double() @ p0 @ m0.double())
    estimate, se = prior.log_normalizer(generator=gen(20))
    assert abs(estimate - log_z) < 5 * se
    # normalized, it is N(mean, cov) exactly
    z = torch.randn(50, 2, generator=gen(21))
    assert torch.allclose((prior.log_prob(z).double() - log_z), mvn_log_prob(z, mean, cov),
                          atol=1e-4)
    draws = prior.sample(20_000, generator=gen(22)).double()
    ess = prior.sampling_info()["ess_fraction"]
    n_eff = len(draws) / (1 + 1 / (prior.config.sir_candidates * ess))
    assert ((draws.mean(0) - mean).abs() < 5 * (cov.diagonal() / n_eff).sqrt()).all()
    # with q = the NCP prior itself, the gain over N(0, I) is KL(q || N(0, I))
    with torch.random.fork_rng():
        torch.manual_seed(23)
        latents = torch.distributions.MultivariateNormal(mean, cov).sample((20_000,)).float()
    delta, delta_se = prior.kl_gain(latents, generator=gen(24))
    kl_std = float(0.5 * (cov.trace() + mean @ mean - 2 - torch.logdet(cov)))
    assert abs(delta - kl_std) < 5 * delta_se


def test_ncp_fits_a_learned_base_first():
    prior = ncpvae.create("prior", "ncp", latent_dim=2, base={"name": "gmm", "components": 2},
                          hidden=[16], epochs=2, min_steps=0, batch_size=128,
                          log_z_samples=2000)
    points = ThreeComponents.sample(600, gen(25)).float()
    summary = prior.fit(points, torch.full_like(points, -2.0), generator=gen(26))
    assert prior.base.is_fitted and "base_fit" in summary
    assert summary["base_fit"]["num_points"] == 600
    check_prior(prior)
    fresh = ncpvae.create("prior", "ncp", latent_dim=2, base={"name": "gmm", "components": 2},
                          hidden=[16])
    assert_round_trip(prior, fresh, torch.randn(4, 2, generator=gen(27)))
    with pytest.raises(ConfigError, match="sample exactly"):
        NCPPrior(prior, classifier=ZeroLogit())


# ---------------------------------------------------------------------------------------------
# vamp


def zero_encoder_model(image_shape=(1, 8, 8), latent_dim=3) -> ncpvae.LatentModel:
    """An MLP VAE whose encoder outputs (0, log 1) for every input."""
    model = ncpvae.create("model", "mlp", latent_dim=latent_dim, image_shape=image_shape)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    encoder_last = next(m for m in last if m.out_features == 2 * latent_dim)
    with torch.no_grad():
        encoder_last.weight.zero_()
        encoder_last.bias.zero_()
    return model


def test_vamp_with_one_pseudo_input_encoding_to_the_origin_is_standard_normal():
    prior = ncpvae.create("prior", "vamp", latent_dim=3, image_shape=(1, 8, 8), components=1)
    with pytest.raises(ConfigError, match="bind_model"):
        prior.log_prob(torch.zeros(3))
    prior.bind_model(zero_encoder_model())
    z = torch.randn(100, 3, generator=gen(28))
    assert torch.allclose(prior.log_prob(z), GaussianPrior(3).log_prob(z), atol=1e-5)
    draws = prior.sample(20_000, generator=gen(29)).double()
    assert (draws.mean(0).abs() < 5 / math.sqrt(20_000)).all()
    assert ((draws.var(0) - 1).abs() < 5 * math.sqrt(2 / 20_000)).all()
    check_prior(prior)
    # the pseudo-inputs are trainable and the model's weights are not the prior's
    assert [name for name, _ in prior.named_parameters()] == ["pseudo_inputs"]
    fresh = ncpvae.create("prior", "vamp", latent_dim=3, image_shape=(1, 8, 8), components=1,
                          seed=5)
    fresh.bind_model(prior.model)
    assert_round_trip(prior, fresh, z)


def test_vamp_trains_end_to_end_on_the_smoke_config(tmp_path):
    from ncpvae.config import load_config
    from ncpvae.run.build import build_run
    from ncpvae.run.stages import fit_prior, sample_stage, train_vae

    config = load_config("smoke", ["prior.name=vamp", "prior.components=4", "train.epochs=1"])
    run = build_run(config, quiet=True)
    run.prior.bind_model(run.model)  # the runner will do this (see Prior.bind_model)
    before = run.prior.pseudo_inputs.detach().clone()
    summary = train_vae(run)
    assert math.isfinite(summary["test_elbo"])
    assert not torch.equal(run.prior.pseudo_inputs.detach(), before)  # trained jointly
    assert fit_prior(run) == {}
    info = sample_stage(run)
    assert isinstance(info, dict)


@pytest.mark.parametrize("overrides", [
    ["prior=ncp", "prior.base.name=gmm", "prior.base.components=2", "prior.epochs=2",
     "prior.min_steps=0"],
    ["prior=flow", "prior.epochs=3", "prior.min_steps=0", "prior.transforms=1",
     "prior.hidden=[16]"],
])
@pytest.mark.slow  # a training per prior
def test_a_fitted_prior_reloads_from_the_run_checkpoint(tmp_path, overrides):
    from ncpvae.config import load_config
    from ncpvae.run.build import create_run, open_run
    from ncpvae.run.fit import fit_prior
    from ncpvae.run.train import train_vae

    config = load_config("smoke", ["train.epochs=1", "evaluate.enabled=false", *overrides])
    run = create_run(config, tmp_path / "run", quiet=True)
    train_vae(run)
    summary = fit_prior(run)
    assert math.isfinite(summary["delta"]) and math.isfinite(summary["delta_se"])
    z = torch.randn(16, 4, generator=gen(30))
    with torch.no_grad():
        expected = run.prior.log_prob(z)
        reopened = open_run(tmp_path / "run", quiet=True)
        assert reopened.prior.is_fitted
        assert torch.equal(reopened.prior.log_prob(z), expected)


# ---------------------------------------------------------------------------------------------
# the shared epoch-loop pieces (ncpvae.fitting) and the fitted flag of LearnedPrior


def test_early_stopping_keeps_and_restores_the_best_state():
    net = nn.Linear(1, 1, bias=False)
    losses = [3.0, 1.0, 2.0, 0.5, 0.7, 0.9, 0.1]  # best at epoch 4, patience 2 stops at epoch 6
    logged = []
    stopper = ncpvae.EarlyStopping(net, epochs=len(losses), patience=2, log=logged.append)
    seen = []
    for epoch in stopper:
        seen.append(epoch)
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        stopper.update({"epoch": float(epoch)}, loss=losses[epoch - 1])
    stopper.restore()
    assert seen == [1, 2, 3, 4, 5, 6]
    assert stopper.best_epoch == 4 and stopper.best_loss == 0.5
    assert float(net.weight.detach()) == 4.0  # the weights of the best epoch, not the last
    assert [r["epoch"] for r in logged] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    summary = stopper.summary(0.0, 10, 2)
    assert summary["epochs_run"] == 6 and summary["stopped_early"]
    assert (summary["num_train"], summary["num_heldout"]) == (10, 2)


def test_epoch_losses_weight_by_batch_size_and_name_the_bad_step():
    losses = ncpvae.EpochLosses()
    for value, size in ((1.0, 3), (2.0, 1)):
        losses.add(torch.tensor(value), size)
    summary = losses.summary("demo", 1, "lower lr")
    assert summary == {"train_loss_mean": pytest.approx(1.25), "train_loss_min": 1.0}
    losses.add(torch.tensor(float("nan")), 2)
    with pytest.raises(ncpvae.NonFiniteError, match="demo fit: .* epoch 7, step 3 of 3; lower lr"):
        losses.summary("demo", 7, "lower lr")


def test_learned_prior_fitted_flag_and_error():
    prior = GMMPrior(GaussianPrior(2), GMMPrior.Config(components=2))
    assert not prior.is_fitted and "fitted" in prior.state_dict()
    with pytest.raises(NotFittedError, match="the gmm prior's sample needs a fitted mixture"):
        prior.sample(3)
    prior.mark_fitted()
    assert prior.is_fitted
    ncp_prior = NCPPrior(GaussianPrior(2), classifier=nn.Linear(2, 1))
    with pytest.raises(NotFittedError, match="needs a trained classifier"):
        ncp_prior.log_prob(torch.zeros(1, 2))
