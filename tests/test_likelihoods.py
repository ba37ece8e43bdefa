"""Pixel likelihoods against closed forms, bits/dim, and the colour models."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

import ncpvae
from ncpvae.model import discretized_logistic_log_prob
from ncpvae.testing import check_model
from ncpvae.units import bits_per_dim

LEVELS = torch.arange(256, dtype=torch.float64) / 255.0


def sigmoid(t: mpmath.mpf) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-t))


def bin_mass_by_hand(k: int, m: float, s: float) -> float:
    """P(x = k/255) of the discretized logistic on [0, 1], edge bins to -inf / +inf, in 50-digit
    arithmetic (a float difference of two sigmoids near 1 would lose the digits compared)."""
    with mpmath.workdps(50):
        x, h, m_, s_ = mpmath.mpf(k) / 255, mpmath.mpf(1) / 510, mpmath.mpf(m), mpmath.mpf(s)
        upper = 1 if k == 255 else sigmoid((x + h - m_) / s_)
        lower = 0 if k == 0 else sigmoid((x - h - m_) / s_)
        return float(upper - lower)


def test_discretized_logistic_sums_to_one_over_the_256_bins() -> None:
    g = torch.Generator().manual_seed(0)
    # 200 pixels with means inside and outside [0, 1] and scales from 1e-3 to 3
    mean = torch.rand(200, generator=g, dtype=torch.float64) * 1.6 - 0.3
    log_scale = torch.rand(200, generator=g, dtype=torch.float64) * math.log(3000) + math.log(1e-3)
    logp = discretized_logistic_log_prob(LEVELS[:, None], mean[None], log_scale[None])  # (256, 200)
    total = torch.logsumexp(logp, dim=0).exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-10)
    assert bool((logp <= 0).all())


@pytest.mark.parametrize("k", [0, 1, 77, 128, 254, 255])
@pytest.mark.parametrize(("m", "s"), [(0.5, 0.1), (0.3, 0.01), (0.9, 0.5), (-0.2, 0.05)])
def test_constant_image_log_likelihood_is_the_bin_mass(k: int, m: float, s: float) -> None:
    shape = (2, 3, 4, 4)  # two constant colour images of 48 pixels
    model = ncpvae.create("model", "mlp", latent_dim=2, image_shape=shape[1:], hidden=[4],
                          likelihood="discretized_logistic", gaussian_scale=s)
    x = torch.full(shape, k / 255.0, dtype=torch.float64)
    model = model.double()
    params = torch.full(shape, m, dtype=torch.float64)
    got = model.recon_log_prob(x, params)
    s_model = math.exp(float(model.log_scale))  # s as the float32 buffer holds it
    assert s_model == pytest.approx(s, rel=1e-6)
    mass = bin_mass_by_hand(k, m, s_model)
    expected = 48 * math.log(mass)
    assert got.tolist() == pytest.approx([expected, expected], rel=1e-9, abs=1e-9)


def test_discretized_logistic_with_uint8_data_in_float32() -> None:
    # data as the loaders give it: uint8 / 255 in float32; the edge bins must still be detected
    x = (torch.tensor([0, 1, 254, 255], dtype=torch.uint8).float() / 255.0)
    logp = discretized_logistic_log_prob(x, torch.full((4,), 0.5), torch.full((4,), math.log(0.2)))
    expected = [math.log(bin_mass_by_hand(k, 0.5, 0.2)) for k in (0, 1, 254, 255)]
    assert logp.tolist() == pytest.approx(expected, rel=1e-4)


def test_discretized_logistic_gradients_are_finite_far_from_the_data() -> None:
    mean = torch.tensor([-50.0, 50.0, 0.5, 0.5], requires_grad=True)
    log_scale = torch.tensor([math.log(1e-3)] * 4, requires_grad=True)
    x = torch.tensor([0.6, 0.3, 0.0, 1.0])
    logp = discretized_logistic_log_prob(x, mean, log_scale)
    assert bool(torch.isfinite(logp).all())
    grads = torch.autograd.grad(logp.sum(), [mean, log_scale])
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_gaussian_learned_per_pixel_scale() -> None:
    model = ncpvae.create("model", "mlp", latent_dim=2, image_shape=(3, 2, 2), hidden=[8],
                          likelihood="gaussian", learn_scale=True, scale_per_pixel=True,
                          gaussian_scale=0.2).double()
    assert tuple(model.log_scale.shape) == (3, 2, 2) and model.log_scale.requires_grad
    with torch.no_grad():
        model.log_scale.fill_(math.log(0.2))  # exactly, in float64
    x = torch.full((1, 3, 2, 2), 0.25, dtype=torch.float64)
    params = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    per_pixel = -0.5 * (0.25 / 0.2) ** 2 - math.log(0.2) - 0.5 * math.log(2 * math.pi)
    assert model.recon_log_prob(x, params).item() == pytest.approx(12 * per_pixel, rel=1e-12)


def test_bits_per_dim_known_cases() -> None:
    d = 3 * 32 * 32
    # the uniform distribution over 256 values: D ln 256 nats = 8 bits per dimension
    assert bits_per_dim(d * math.log(256), d) == pytest.approx(8.0, rel=1e-12)
    assert bits_per_dim(d * math.log(2), d) == pytest.approx(1.0, rel=1e-12)
    # the uniform density on [0, 1] (log density 0): the discrete bound is D ln 256 nats
    assert bits_per_dim(0.0, d, continuous_on_unit_interval=True) == pytest.approx(8.0)
    # a density of e per dim on [0, 1]: -D nats -> -1/ln 2 + 8 bits
    assert bits_per_dim(-d, d, continuous_on_unit_interval=True) == pytest.approx(
        8.0 - 1.0 / math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(1.0, 0)


def test_models_say_which_bits_per_dim_formula_applies() -> None:
    kwargs = {"latent_dim": 2, "image_shape": (1, 8, 8), "hidden": [4]}
    bern = ncpvae.create("model", "mlp", **kwargs)
    gauss = ncpvae.create("model", "mlp", likelihood="gaussian", **kwargs)
    logi = ncpvae.create("model", "mlp", likelihood="discretized_logistic", **kwargs)
    assert (bern.discrete_bins, bern.continuous_on_unit_interval) == (None, False)
    assert (gauss.discrete_bins, gauss.continuous_on_unit_interval) == (None, True)
    assert (logi.discrete_bins, logi.continuous_on_unit_interval) == (256, False)
    assert bern.bits_per_dim(100.0, 64) is None
    assert logi.bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0)
    assert gauss.bits_per_dim(64 * math.log(2), 64) == pytest.approx(9.0)


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64)])
def test_colour_conv_models_pass_the_contract(shape: tuple[int, int, int]) -> None:
    channels = [8, 8, 16] if shape[1] == 32 else [8, 8, 16, 16]
    model = ncpvae.create("model", "conv", latent_dim=4, image_shape=shape, channels=channels,
                          hidden=32, likelihood="discretized_logistic", learn_scale=True,
                          scale_per_pixel=True)
    check_model(model, shape)
    with torch.no_grad():
        mean = model.mean_image(model.decode(torch.zeros(2, 4)))
    assert tuple(mean.shape) == (2, *shape) and float(mean.min()) >= 0 and float(mean.max()) <= 1


def test_conv_channels_per_stage_must_match_the_image() -> None:
    with pytest.raises(ncpvae.ConfigError, match="3 of them"):
        ncpvae.create("model", "conv", latent_dim=2, image_shape=(3, 32, 32), channels=[8, 8])


def test_colour_grid_is_drawn_in_colour(tmp_path) -> None:
    from ncpvae.plots.training import image_grid, plot_reconstructions

    images = torch.zeros(4, 3, 8, 8)
    images[:, 0] = 1.0  # pure red
    grid = image_grid(images, nrow=2)
    assert grid.shape[-1] == 3
    assert float(grid[1, 1, 0]) == 1.0 and float(grid[1, 1, 1]) == 0.0
    plot_reconstructions(images, images, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
