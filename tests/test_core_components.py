"""The built-in core components against closed forms: gaussian prior, beta-ELBO, models,
registry errors and in-memory image sources."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ncpvae_plugins.beta_elbo import BetaELBO
from ncpvae_plugins.gaussian import GaussianPrior
from ncpvae_plugins.models import MLPVAE, ConvVAE, num_halvings
from torch import nn

import ncpvae
from ncpvae.data import TensorImageSource
from ncpvae.errors import ConfigError, DataError, PluginError, UnknownComponentError
from ncpvae.model import LatentModel
from ncpvae.registry import Registry

Z_MAX = 5.0  # |z| bound on standardized Monte Carlo errors (docs/samplers.md §10, testing method)
F64 = torch.float64


def zscore(estimate: float, expected: float, se: float) -> float:
    return abs(estimate - expected) / se


def gaussian_prior(d: int, mean: float = 0.0, scale: float = 1.0, **kw) -> GaussianPrior:
    return GaussianPrior(d, GaussianPrior.Config(mean=mean, scale=scale, **kw)).to(F64)


# --------------------------------------------------------------------------------------------
# gaussian prior


@settings(derandomize=True, max_examples=20, deadline=None)
@given(d=st.integers(1, 8), mean=st.floats(-3, 3), scale=st.floats(0.1, 5),
       shape=st.lists(st.integers(1, 3), max_size=3).map(tuple))
def test_gaussian_log_prob_matches_torch_distributions(d, mean, scale, shape):
    prior = gaussian_prior(d, mean, scale)
    z = torch.randn(*shape, d, dtype=F64, generator=torch.Generator().manual_seed(d))
    # the configured values are stored as float32 before the cast: compare the formula on the
    # stored values exactly, and the stored values with float32 precision
    torch.testing.assert_close(prior.log_scale.exp(), torch.full((d,), scale, dtype=F64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(prior.loc, torch.full((d,), mean, dtype=F64), rtol=1e-6, atol=1e-7)
    reference = torch.distributions.Normal(prior.loc, prior.log_scale.exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prior.energy(z), -reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean,scale", [(0.0, 1.0), (1.5, 0.5), (-2.0, 3.0)])
def test_gaussian_closed_form_kl_matches_monte_carlo(mean, scale):
    prior = gaussian_prior(3, mean, scale)
    mu = torch.tensor([[0.0, 1.0, -2.0], [0.5, -0.5, 3.0]], dtype=F64)
    logvar = torch.tensor([[0.0, -1.0, 1.0], [-2.0, 0.5, 0.0]], dtype=F64)
    closed = prior.kl_from_gaussian(mu, logvar)  # (B, D)
    assert closed.shape == (2, 3)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, 2, 3, dtype=F64, generator=g)
    samples = q.log_prob(z).sum(-1) - prior.log_prob(z)  # (n, B): one KL estimate per draw
    for b in range(2):
        est, se = float(samples[:, b].mean()), float(samples[:, b].std() / math.sqrt(n))
        assert zscore(est, float(closed[b].sum()), se) < Z_MAX, (b, est, float(closed[b].sum()))


def test_gaussian_kl_is_zero_at_the_prior_and_positive_elsewhere():
    prior = gaussian_prior(2, 0.5, 2.0)
    mu = torch.full((1, 2), 0.5, dtype=F64)
    logvar = torch.full((1, 2), 2 * math.log(2.0), dtype=F64)
    torch.testing.assert_close(prior.kl_from_gaussian(mu, logvar), torch.zeros(1, 2, dtype=F64))
    assert (prior.kl_from_gaussian(mu + 0.1, logvar) > 0).all()


def test_gaussian_samples_match_mean_and_variance(generator):
    prior = gaussian_prior(2, mean=1.5, scale=0.5)
    n = 50_000
    z = prior.sample(n, generator=generator)
    assert z.shape == (n, 2) and z.dtype == F64
    se_mean = 0.5 / math.sqrt(n)
    se_var = 0.25 * math.sqrt(2 / (n - 1))
    for j in range(2):
        assert zscore(float(z[:, j].mean()), 1.5, se_mean) < Z_MAX
        assert zscore(float(z[:, j].var()), 0.25, se_var) < Z_MAX


def test_gaussian_fixed_parameters_are_buffers():
    prior = GaussianPrior(3)
    assert list(prior.parameters()) == []
    assert {"loc", "log_scale"} <= set(prior.state_dict())


def test_gaussian_learnable_mean_and_scale_get_gradients():
    prior = gaussian_prior(3, learn_mean=True, learn_scale=True)
    assert {name for name, _ in prior.named_parameters()} == {"loc", "log_scale"}
    z = torch.randn(5, 3, dtype=F64)
    loc_grad, scale_grad = torch.autograd.grad(prior.log_prob(z).sum(), [prior.loc,
                                                                         prior.log_scale])
    # d/dm sum log N(z; m, s) = sum (z - m) / s^2 ; d/dlog s = sum ((z - m)^2 / s^2 - 1)
    torch.testing.assert_close(loc_grad, z.sum(0))
    torch.testing.assert_close(scale_grad, (z**2 - 1).sum(0))
    mu, logvar = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    grads = torch.autograd.grad(prior.kl_from_gaussian(mu, logvar).sum(), [prior.loc,
                                                                          prior.log_scale])
    assert all(g.abs().sum() > 0 for g in grads)


def test_gaussian_only_learnable_mean():
    prior = GaussianPrior(2, GaussianPrior.Config(learn_mean=True))
    assert [name for name, _ in prior.named_parameters()] == ["loc"]


def test_gaussian_config_bounds(registry):
    with pytest.raises(ConfigError, match="scale"):
        ncpvae.create("prior", "gaussian", latent_dim=2, scale=0.0, registry=registry)
    with pytest.raises(ValueError, match="latent_dim"):
        GaussianPrior(0)
    with pytest.raises(ValueError, match="latent_dim"):
        ncpvae.create("prior", "gaussian", registry=registry)  # no latent_dim given


# --------------------------------------------------------------------------------------------
# beta-ELBO: a deterministic stub model makes every term computable by hand


class StubModel(LatentModel):
    """``mu_j = (j + 1) * mean(x) - 0.5``, constant ``logvar``; decodes every pixel to the same
    logit ``w * sum(z)``. Both depend on the image only through its pixel mean, so tiling an
    image leaves the latents unchanged and doubles the pixel count."""

    name = "stub"

    def __init__(self, latent_dim: int, logvar: float, image_shape=(1, 2, 2)):
        super().__init__(latent_dim)
        self.w = nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.logvar = logvar
        self.image_shape = tuple(image_shape)

    def encode(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        scale = torch.arange(1, self.latent_dim + 1, dtype=x.dtype)
        mu = scale * m - 0.5 + 0 * self.w
        return mu, torch.full_like(mu, self.logvar)

    def decode(self, z):
        logit = self.w * z.sum(-1)
        return logit[..., None, None, None].expand(*z.shape[:-1], *self.image_shape)


DETERMINISTIC = -200.0  # posterior std e^-100: z = mu exactly in float64


def stub_loss(objective, x, prior, logvar=DETERMINISTIC, step=0):
    model = StubModel(prior.latent_dim, logvar, x.shape[1:])
    return objective.loss(x, model, prior, step=step), model


def hand_terms(x, model, prior):
    """Per-example ``-log p(x|mu)`` and KL, computed independently of the objective."""
    mu, logvar = model.encode(x)
    logits = model.decode(mu)
    log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    var, s2 = logvar.exp(), (2 * prior.log_scale).exp()
    kl = 0.5 * (var / s2 + (mu - prior.loc) ** 2 / s2 - 1 - logvar + 2 * prior.log_scale)
    return -log_px, kl.sum(-1)


def binary_images(b: int, shape=(1, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, *shape, generator=g, dtype=F64) > 0.5).to(F64)


@pytest.mark.parametrize("beta", [0.0, 0.75, 1.0, 4.0])
def test_beta_elbo_terms_and_beta_scaling(beta):
    prior = gaussian_prior(3, 0.2, 1.5)
    x = binary_images(5)
    out, model = stub_loss(BetaELBO(beta=beta), x, prior)
    recon, kl = hand_terms(x, model, prior)
    torch.testing.assert_close(out["recon"], recon.mean())
    torch.testing.assert_close(out["kl"], kl.mean())
    torch.testing.assert_close(out["loss"], (recon + beta * kl).mean())
    torch.testing.assert_close(out["elbo"], (-recon - kl).mean())
    assert out["kl_per_dim"].shape == (3,)
    torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"])


def test_beta_elbo_is_a_batch_mean():
    """Duplicating every row leaves the loss unchanged (a batch sum would double it)."""
    prior = gaussian_prior(3)
    objective = BetaELBO(beta=2.0)
    x = binary_images(4)
    single, _ = stub_loss(objective, x, prior)
    double, _ = stub_loss(objective, torch.cat([x, x]), prior)
    for key in ("loss", "recon", "kl"):
        torch.testing.assert_close(double[key], single[key], rtol=1e-12, atol=0)


def test_beta_elbo_sums_over_pixels():
    """Tiling each image twice (same latents, twice the pixels) doubles recon but not KL; a
    pixel mean would leave recon unchanged and silently rescale beta."""
    prior = gaussian_prior(3)
    objective = BetaELBO(beta=1.0)
    x = binary_images(4, shape=(1, 2, 3))
    base, _ = stub_loss(objective, x, prior)
    tiled, _ = stub_loss(objective, torch.cat([x, x], dim=-1), prior)
    torch.testing.assert_close(tiled["recon"], 2 * base["recon"], rtol=1e-12, atol=0)
    torch.testing.assert_close(tiled["kl"], base["kl"], rtol=1e-12, atol=0)
    assert base["recon"] > 0.1  # the test means something: recon is not negligible


def test_beta_elbo_sums_over_latent_dims():
    """The KL of D identical dimensions is D times that of one."""
    x = binary_images(3)
    objective = BetaELBO()

    class Repeated(StubModel):
        def encode(self, x):
            mu, logvar = StubModel(1, self.logvar).encode(x)
            return mu.expand(-1, self.latent_dim), logvar.expand(-1, self.latent_dim)

    kls = []
    for d in (1, 4):
        model = Repeated(d, -1.0)
        mu, logvar = model.encode(x)
        kls.append(float(gaussian_prior(d).kl_from_gaussian(mu, logvar).sum(-1).mean().detach()))
        torch.manual_seed(0)
        assert float(objective.loss(x, model, gaussian_prior(d))["kl"]) == pytest.approx(kls[-1])
    assert kls[1] == pytest.approx(4 * kls[0])


def test_capacity_schedule_values():
    objective = BetaELBO(capacity_max=20.0, capacity_steps=100)
    for step, expected in [(0, 0.0), (25, 5.0), (50, 10.0), (100, 20.0), (1000, 20.0)]:
        assert objective.capacity(step) == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 30, 500])
def test_capacity_loss_is_gamma_times_distance_to_capacity(step):
    prior = gaussian_prior(2)
    objective = BetaELBO(capacity_max=40.0, capacity_steps=100, gamma=10.0)
    x = binary_images(6)
    out, model = stub_loss(objective, x, prior, step=step)
    recon, kl = hand_terms(x, model, prior)
    c = 40.0 * min(1.0, step / 100)
    torch.testing.assert_close(out["loss"], (recon + 10.0 * (kl - c).abs()).mean())
    torch.testing.assert_close(out["kl"], kl.mean())


class NoClosedFormPrior(GaussianPrior):
    """The gaussian prior without its closed-form KL: the objective must fall back to MC."""

    name = "gaussian-mc"

    def kl_from_gaussian(self, mu, logvar):
        return None


@pytest.mark.slow
def test_monte_carlo_kl_agrees_with_the_closed_form_in_expectation():
    closed_prior = gaussian_prior(3, 0.3, 1.2)
    mc_prior = NoClosedFormPrior(3, GaussianPrior.Config(mean=0.3, scale=1.2)).to(F64)
    objective = BetaELBO(beta=1.0)
    x = binary_images(64, seed=1)
    logvar = math.log(0.3)
    exact, model = stub_loss(objective, x, closed_prior, logvar=logvar)
    assert "kl_per_dim" in exact
    torch.manual_seed(0)
    batch_means = torch.stack([stub_loss(objective, x, mc_prior, logvar=logvar)[0]["kl"]
                               for _ in range(200)])
    first, _ = stub_loss(objective, x, mc_prior, logvar=logvar)
    assert "kl_per_dim" not in first  # no per-dimension split without a closed form
    se = float(batch_means.std() / math.sqrt(len(batch_means)))
    assert se > 0
    assert zscore(float(batch_means.mean()), float(exact["kl"]), se) < Z_MAX


def test_beta_elbo_config_bounds(registry):
    with pytest.raises(ConfigError, match="beta"):
        ncpvae.create("objective", "beta_elbo", beta=-1.0, registry=registry)
    objective = ncpvae.create("objective", "beta_elbo", beta=0.5, capacity_max=3.0,
                              registry=registry)
    assert (objective.beta, objective.capacity_max) == (0.5, 3.0)


# --------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("size,stages", [(64, 4), (32, 3), (28, 2), (8, 1)])
def test_conv_stage_counts(size, stages):
    assert num_halvings(size) == stages
    model = ConvVAE((1, size, size), 4)
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in model.decoder_conv if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == len(deconvs) == stages
    assert model.feature_shape == (32, size >> stages, size >> stages)
    assert deconvs[-1].out_channels == 1
    x = torch.rand(2, 1, size, size)
    assert model.decode(model.encode(x)[0]).shape == x.shape


def test_conv_non_square_and_colour():
    model = ConvVAE((3, 32, 16), 2)
    assert model.feature_shape == (32, 8, 4)  # 16 allows 2 stages (>= 4 px), so both get 2
    assert model.decode(torch.zeros(1, 2)).shape == (1, 3, 32, 16)


@pytest.mark.parametrize("shape", [(1, 7, 7), (1, 6, 6), (1, 9, 9), (1, 64, 5)])
def test_conv_rejects_unhalvable_shapes(shape, registry):
    with pytest.raises(ConfigError, match="conv model needs an even image size"):
        ncpvae.create("model", "conv", latent_dim=2, image_shape=shape, registry=registry)


@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_models_need_an_image_shape(name, registry):
    with pytest.raises(ConfigError, match=f"the {name} model needs the image shape"):
        ncpvae.create("model", name, latent_dim=2, registry=registry)


def test_mlp_rejects_bad_hidden_sizes(registry):
    with pytest.raises(ConfigError, match="hidden"):
        ncpvae.create("model", "mlp", latent_dim=2, image_shape=(1, 4, 4), hidden=[8, 0],
                      registry=registry)
    with pytest.raises(ConfigError, match="model 'mlp' config: hidden"):
        ncpvae.create("model", "mlp", latent_dim=2, image_shape=(1, 4, 4), hidden=[],
                      registry=registry)


def test_bernoulli_recon_matches_torch_distributions():
    model = MLPVAE((1, 3, 3), 2, hidden=[4]).to(F64)
    x = binary_images(4, shape=(1, 3, 3))
    logits = torch.randn(4, 1, 3, 3, dtype=F64)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.recon_log_prob(x, logits), expected)


def test_gaussian_recon_matches_torch_distributions():
    model = MLPVAE((2, 2, 2), 2, hidden=[4], likelihood="gaussian", gaussian_scale=0.2).to(F64)
    x = torch.rand(3, 2, 2, 2, dtype=F64)
    means = torch.rand(3, 2, 2, 2, dtype=F64)
    expected = torch.distributions.Normal(means, 0.2).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.recon_log_prob(x, means), expected)
    assert list(model.parameters()) and "log_scale" not in dict(model.named_parameters())
    learned = MLPVAE((2, 2, 2), 2, hidden=[4], likelihood="gaussian", learn_scale=True)
    assert "log_scale" in dict(learned.named_parameters())


def test_unknown_likelihood_is_rejected():
    with pytest.raises(ValueError, match="likelihood"):
        MLPVAE((1, 2, 2), 2, hidden=[4], likelihood="poisson")


# --------------------------------------------------------------------------------------------
# registry


class Thing(GaussianPrior):
    name = "thing"


def test_registry_lookup_and_listing():
    registry = Registry()
    registry.register("prior", Thing, "my-plugin")
    assert registry.get("prior", "thing") is Thing
    assert registry.names("prior") == ["thing"] and registry.names("sampler") == []
    assert registry.source("prior", "thing") == "my-plugin"
    assert ("prior", "thing") in registry and ("sampler", "thing") not in registry
    assert registry.items() == [("prior", "thing", Thing, "my-plugin")]


def test_registry_unknown_name_suggests_and_lists():
    registry = Registry()
    registry.register("prior", Thing, "my-plugin")
    with pytest.raises(UnknownComponentError) as info:
        registry.get("prior", "thin")
    assert str(info.value) == "unknown prior 'thin' (did you mean 'thing'?); available: thing"
    with pytest.raises(UnknownComponentError, match="available: none"):
        registry.get("sampler", "thing")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)


def test_registry_unknown_kind_suggests():
    with pytest.raises(UnknownComponentError, match="unknown component kind 'priors'.*'prior'"):
        Registry().names("priors")
    with pytest.raises(UnknownComponentError, match="kinds: dataset, model, prior"):
        Registry().register("widget", Thing, "p")


def test_registry_registration_errors():
    registry = Registry()
    registry.register("prior", Thing, "first")
    with pytest.raises(PluginError, match="'first'.*'second'"):
        registry.register("prior", Thing, "second")
    with pytest.raises(PluginError, match="registered sampler 'thing', but the class is a prior"):
        registry.register("sampler", Thing, "first")

    class Nameless:
        kind = "prior"

    with pytest.raises(PluginError, match="without a `name`"):
        registry.register("prior", Nameless, "first")


# --------------------------------------------------------------------------------------------
# in-memory image sources


def test_tensor_source_uint8_is_scaled_per_batch():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(3, 1, 1, 1)
    source = TensorImageSource(images, torch.tensor([0, 1, 2]))
    batch = source.get_batch(torch.tensor([2, 0]))
    assert batch.dtype == torch.float32 and batch.shape == (2, 1, 1, 1)
    torch.testing.assert_close(batch.flatten(), torch.tensor([1.0, 0.0]))
    assert source.images.dtype == torch.uint8 and len(source) == 3
    assert source.image_shape == (1, 1, 1)


@pytest.mark.parametrize("images,match", [
    (torch.full((2, 1, 2, 2), float("nan")), "NaN or infinite"),
    (torch.full((2, 1, 2, 2), float("inf")), "NaN or infinite"),
    (torch.full((2, 1, 2, 2), 1.5), r"must lie in \[0, 1\].*divide by 255"),
    (torch.full((2, 1, 2, 2), -0.1), r"must lie in \[0, 1\]"),
    (torch.zeros(2, 2, 2), r"expected images of shape \(N, C, H, W\), got \(2, 2, 2\)"),
    (torch.zeros(1, 2, 2, 2, 2), r"expected images of shape \(N, C, H, W\)"),
    (torch.zeros(2, 1, 2, 2, dtype=torch.int32), "uint8 or floating point"),
])
def test_tensor_source_rejects_bad_images(images, match):
    with pytest.raises(DataError, match=f"my data: .*{match}"):
        TensorImageSource(images, what="my data")


def test_tensor_source_rejects_mismatched_labels():
    with pytest.raises(DataError, match="3 labels for 2 images"):
        TensorImageSource(torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.long))
