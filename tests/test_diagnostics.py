"""Tests of the MCMC diagnostics (ESS, split R-hat, MCSE, summaries) and the sampler plots.

ESS tolerances follow Sokal's variance of the integrated autocorrelation time estimate,
``Var(tau_hat) / tau^2 ≈ 2 (2M + 1) / N`` with M the summation window (bounded generously
below), and |z| < 5.
"""

from __future__ import annotations

import math

import pytest
import torch

from ncpvae.errors import DataError
from ncpvae.mcmc.diagnostics import (
    acceptance_summary,
    autocovariance,
    ess,
    mcse_mean,
    mean_autocovariance,
    split_rhat,
    summarize,
)
from ncpvae.plots.samplers import plot_energy_traces, plot_trajectories

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ar1(rho: float, steps: int, chains: int, dim: int, seed: int) -> torch.Tensor:
    """Stationary AR(1) chains with unit marginal variance, ``(S, C, D)``."""
    g = gen(seed)
    noise = torch.randn(steps, chains, dim, generator=g, dtype=F64)
    x = torch.empty_like(noise)
    x[0] = noise[0]
    scale = math.sqrt(1 - rho**2)
    for t in range(1, steps):
        x[t] = rho * x[t - 1] + scale * noise[t]
    return x


def sokal_rel_sd(window: int, n: int) -> float:
    return math.sqrt(2 * (2 * window + 1) / n)


def test_autocovariance_matches_the_direct_sum():
    x = torch.randn(50, 3, 2, generator=gen(0), dtype=F64)
    acov = autocovariance(x)
    xc = x - x.mean(0)
    for lag in (0, 1, 7, 49):
        direct = (xc[: 50 - lag] * xc[lag:]).sum(0) / 50
        torch.testing.assert_close(acov[lag], direct)


@pytest.mark.parametrize("draws", [20, 600])  # the Gram and the FFT paths
def test_mean_autocovariance_is_the_chain_average(draws):
    x = torch.randn(draws, 6, 3, generator=gen(9), dtype=F64)
    torch.testing.assert_close(mean_autocovariance(x), autocovariance(x).mean(1))


def test_ess_of_iid_draws_is_the_number_of_draws():
    s, c = 1000, 100
    x = torch.randn(s, c, 3, generator=gen(1), dtype=F64)
    n = s * c
    e = ess(x)
    tol = 5 * sokal_rel_sd(10, n)  # i.i.d.: Geyer's window stops within a few lags
    assert ((e / n - 1).abs() < tol).all(), e / n


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_ess_of_an_ar1_chain(rho):
    s, c = 2000, 100
    x = ar1(rho, s, c, 2, seed=2)
    n = s * c
    expected = n * (1 - rho) / (1 + rho)
    tau = (1 + rho) / (1 - rho)
    e = ess(x)
    tol = 5 * sokal_rel_sd(int(10 * tau) + 10, n)  # window: a few autocorrelation times
    assert ((e / expected - 1).abs() < tol).all(), (e / expected, tol)
    # a naive "ESS = number of draws" would be rejected
    assert ((e / n - 1).abs() > tol).all()


def test_split_rhat_is_one_for_iid_and_large_for_disagreeing_chains():
    x = torch.randn(2000, 8, 2, generator=gen(3), dtype=F64)
    r = split_rhat(x)
    assert ((r - 1).abs() < 0.01).all(), r
    shifted = x.clone()
    shifted[:, :4] += 1.0  # half the chains sit one sd away
    assert (split_rhat(shifted) > 1.1).all()


def test_split_rhat_catches_a_trend_within_chains():
    x = torch.randn(2000, 8, 1, generator=gen(4), dtype=F64)
    trend = torch.linspace(0, 3, 2000, dtype=F64).reshape(-1, 1, 1)
    assert split_rhat(x + trend)[0] > 1.1  # every chain agrees, but none is stationary


def test_mcse_is_sd_over_root_ess():
    x = ar1(0.5, 1000, 50, 2, seed=5)
    mc = mcse_mean(x)
    sd = x.reshape(-1, 2).std(0)
    torch.testing.assert_close(mc, sd / torch.sqrt(ess(x)))
    # and it is the actual spread of chain-group means: true MCSE = sqrt(tau / N)
    true = math.sqrt(3.0 / x[:, :, 0].numel())
    assert ((mc / true - 1).abs() < 5 * sokal_rel_sd(40, x[:, :, 0].numel())).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_summarize_matches_the_separate_functions(dtype):
    # chains with different means and scales, so the between-chain part of the variance counts
    x = ar1(0.7, 64, 12, 3, seed=8).to(dtype)
    x = x * torch.linspace(0.5, 2.0, 12, dtype=dtype)[:, None] + 3 * torch.arange(12.0,
                                                                                 dtype=dtype)[:, None]
    out = summarize(x)
    torch.testing.assert_close(torch.tensor(out["ess"], dtype=F64), ess(x))
    torch.testing.assert_close(torch.tensor(out["rhat"], dtype=F64), split_rhat(x))
    # the summary's MCSE takes the variance from the ESS's within/between parts instead of a
    # separate pass: the same number up to the float32 lag products (~1e-7 of the variance)
    torch.testing.assert_close(torch.tensor(out["mcse_mean"], dtype=F64), mcse_mean(x),
                               rtol=1e-6, atol=0)


def test_short_or_constant_inputs_give_nan_not_errors():
    assert torch.isnan(ess(torch.randn(3, 4, 2, dtype=F64))).all()
    assert torch.isnan(split_rhat(torch.randn(3, 4, 2, dtype=F64))).all()
    assert torch.isnan(ess(torch.ones(20, 4, 1, dtype=F64))).all()
    with pytest.raises(DataError, match=r"\(S, C, D\)"):
        ess(torch.randn(10, 3))


def test_acceptance_summary():
    acc = torch.tensor([[1.0, 0.0], [1.0, 0.5]], dtype=F64)
    out = acceptance_summary(acc)
    assert out == {"mean": 0.625, "chain_min": 0.25, "chain_max": 1.0, "last": 0.75}
    assert math.isnan(acceptance_summary(torch.empty(0, 3))["mean"])


def test_summarize_is_json_ready():
    import json

    out = summarize(torch.randn(100, 4, 3, generator=gen(6), dtype=F64))
    assert set(out) >= {"num_draws", "num_chains", "ess", "ess_min", "ess_median", "rhat",
                        "rhat_max", "mcse_mean"}
    assert out["num_draws"] == 100 and out["num_chains"] == 4 and len(out["ess"]) == 3
    json.dumps(out)


# ---------------------------------------------------------------------------------------------
# plots


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_energy_traces(tmp_path):
    energies = torch.randn(50, 40, generator=gen(7)).cumsum(0)
    out = plot_energy_traces(energies, tmp_path / "plots" / "energy.png")
    assert out.exists() and _is_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["energy.png"]  # no temp files left
    with pytest.raises(DataError):
        plot_energy_traces(torch.randn(5), tmp_path / "bad.png")


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_plot_trajectories(tmp_path, dim):
    samples = torch.randn(30, 12, dim, generator=gen(8), dtype=F64).cumsum(0) * 0.1

    def energy(z):
        return 0.5 * (z**2).sum(-1)

    out = plot_trajectories(samples, energy, tmp_path / f"traj{dim}.png", num_chains=4)
    assert _is_png(out)
    assert _is_png(plot_trajectories(samples, None, tmp_path / "plain.png"))


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError):
        plot_energy_traces(torch.randn(5, 3), tmp_path / "energy.notaformat")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# device: the diagnostics stay on the samples' device (no CPU tensor is mixed in)


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps, chains", [(3, 1), (50, 1), (600, 1), (50, 4)])
def test_diagnostics_stay_on_the_samples_device(device, steps, chains):
    # "meta" tensors carry shapes and devices but no data: any CPU tensor mixed into the
    # computation (e.g. a zero between-chain variance for a single chain) raises there.
    x = torch.randn(steps, chains, 3, device=device)
    for fn in (ess, split_rhat, mcse_mean):
        out = fn(x)
        assert out.device.type == device and out.shape == (3,)
    if device != "meta":
        assert summarize(x)["num_chains"] == chains
