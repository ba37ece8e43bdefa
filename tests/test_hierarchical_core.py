"""Hierarchical NCP maths (``ncpvae.hierarchical``) on a two-group linear-Gaussian model.

Every conditional of ``q`` and ``p`` is Gaussian (tests/helpers/linear_gaussian.py), so the
optimal per-group log-ratios, the per-group Deltas, the per-context ``log Z_k`` of a quadratic
tilt and the moments of the tilted joint are known in closed form. Tolerances are Monte Carlo
standard errors (z-scores), never observed numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import linear_gaussian as lg
from ncpvae_plugins.langevin import LangevinSampler

from ncpvae.errors import ConfigError, DataError
from ncpvae.hierarchical import (
    HierarchicalTilt,
    check_group_sizes,
    fit_group_classifiers,
    group_gains,
    joint_energy,
    log_normalizer_per_context,
    sample_groupwise,
    sample_groupwise_sir,
    split_groups,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mala(num_steps: int = 300, burn_in: int = 150) -> object:
    sampler = LangevinSampler(LangevinSampler.Config(
        step_size=0.1, metropolis=True, adapt_step_size=True, adapt_per_chain=True))

    def move(energy, init, generator):
        return sampler.run(energy, init, num_steps, burn_in=burn_in, generator=generator,
                           diagnose=False, keep_info="summary").samples[-1]

    return move


def _assert_moments(draws: torch.Tensor, mean: np.ndarray, cov: np.ndarray, limit: float = 4.5):
    """All 4 means and 10 distinct covariances within ``limit`` standard errors."""
    mean_z, cov_z = lg.moment_z_scores(draws, mean, cov)
    worst = max(np.abs(mean_z).max(), np.abs(cov_z[np.triu_indices(4)]).max())
    assert worst < limit, f"mean z {mean_z.round(2)}, cov z {cov_z.round(2)}"


def test_base_prior_log_prob_is_the_joint_gaussian_and_samples_ancestrally():
    p = lg.base_prior()
    mean = np.zeros(4)
    cov = np.zeros((4, 4))
    cov[:2, :2] = np.eye(2)
    cov[2:, :2] = lg.A
    cov[:2, 2:] = lg.A.T
    cov[2:, 2:] = lg.A @ lg.A.T + lg.S2 * np.eye(2)
    z = torch.randn(50, 4, generator=_gen(0), dtype=lg.DT)
    exact = torch.distributions.MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    torch.testing.assert_close(p.log_prob(z), exact.log_prob(z))
    assert p.log_prob(z.reshape(5, 10, 4)).shape == (5, 10)
    _assert_moments(p.sample(20_000, generator=_gen(1)), mean, cov)


@pytest.mark.slow
def test_optimal_classifiers_give_the_closed_form_deltas_and_unit_normalizers():
    p, q = lg.base_prior(), lg.posterior()
    held = q.sample(4000, generator=_gen(2))
    gains = group_gains(p, lg.optimal_tilt(), held, 500, generator=_gen(3))
    for got, exact in zip(gains, lg.exact_deltas()):
        assert abs(got["delta"] - got["log_z_bias"] - exact) < 4 * got["se"], (got, exact)
        # Z_k(c) = 1 for every context: E_q[log Z_k] is 0 up to its Jensen bias ~ -SE^2 / 2
        assert abs(got["mean_log_z"] + got["log_z_bias"]) < 4 * got["se"]


@pytest.mark.slow
def test_per_context_log_z_matches_the_closed_form_and_its_se_is_calibrated():
    p = lg.base_prior()
    tilt = lg.quadratic_tilt()
    contexts = lg.posterior().sample(1000, generator=_gen(4))[:, :2]
    for k, context in ((0, contexts[:, :0]), (1, contexts)):
        log_z, se = log_normalizer_per_context(p, tilt, k, context, 1000, generator=_gen(5 + k))
        err = log_z.numpy() - lg.quadratic_log_z(k, context.numpy())
        se = se.numpy()
        # calibrated SE: the spread of 1000 independent errors is the reported SE ...
        assert 0.9 < err.std() / np.sqrt((se**2).mean()) < 1.1, (k, err.std(), se.mean())
        # ... and their mean is the Jensen bias -SE^2 / 2, within the SE of a mean of 1000
        bias = -(se**2).mean() / 2
        assert abs(err.mean() - bias) < 4 * err.std() / np.sqrt(len(err)), (k, err.mean(), bias)


@pytest.mark.slow
def test_group_gains_of_a_quadratic_tilt_use_each_contexts_normalizer():
    """Delta_k = E_q[r_k] - E_q[log Z_k(z_<k)] with the exact per-context log Z; dropping the
    context dependence (the log Z of the mean context) would miss it."""
    p, q = lg.base_prior(), lg.posterior()
    tilt = lg.quadratic_tilt()
    held = q.sample(4000, generator=_gen(6))
    gains = group_gains(p, tilt, held, 500, generator=_gen(7))
    for k, got in enumerate(gains):
        z_k, context = split_groups(held, lg.SIZES)[k], held[:, :2 * k]
        terms = tilt.logit(k, z_k, context).numpy() - lg.quadratic_log_z(k, context.numpy())
        # only the Monte Carlo log Z differs: its per-row SE is sqrt(2 * log_z_bias) on average
        tolerance = 4 * np.sqrt(2 * got["log_z_bias"] / len(terms))
        assert abs(got["delta"] - got["log_z_bias"] - terms.mean()) < tolerance, (k, got)


@pytest.mark.slow
def test_fitted_classifiers_recover_each_groups_delta():
    p, q = lg.base_prior(), lg.posterior()
    tilt = HierarchicalTilt(lg.SIZES, hidden=(32, 32), seed=0).double()
    out = fit_group_classifiers(p, tilt, q.sample(8000, generator=_gen(8)), epochs=12,
                                batch_size=256, lr=3e-3, generator=_gen(9))
    first, last = out["history"][0]["heldout_loss"], out["history"][-1]["heldout_loss"]
    assert all(b <= a for a, b in zip(first, last))
    gains = group_gains(p, tilt, q.sample(5000, generator=_gen(10)), 500, generator=_gen(11))
    for got, exact in zip(gains, lg.exact_deltas()):
        assert abs(got["delta"] - got["log_z_bias"] - exact) < 4 * got["se"], (got, exact)


@pytest.mark.slow
def test_budgeted_fit_with_fixed_heldout_pairs_recovers_each_groups_delta():
    """The plugin's way of fitting: fresh training draws every epoch, a fixed held-out set,
    at least ``min_steps`` steps, 2-paired-SE early stopping, the best weights restored."""
    p, q = lg.base_prior(), lg.posterior()
    tilt = HierarchicalTilt(lg.SIZES, hidden=(32, 32), seed=0).double()
    out = fit_group_classifiers(p, tilt, q.sample(2000, generator=_gen(20)),
                                heldout=q.sample(2000, generator=_gen(21)),
                                resample=lambda g: q.sample(2000, generator=g), epochs=5,
                                patience=3, min_steps=600, batch_size=256, lr=3e-3,
                                generator=_gen(22))
    assert out["min_epochs"] == 75 and out["steps_run"] >= 600  # 8 steps an epoch
    assert out["epochs_run"] == 75 and not out["stopped_early"]  # the budget raised epochs=5
    best = min(out["history"], key=lambda r: sum(r["heldout_loss"]))
    assert out["best_epoch"] == best["epoch"]
    gains = group_gains(p, tilt, q.sample(5000, generator=_gen(23)), 500, generator=_gen(24))
    for got, exact in zip(gains, lg.exact_deltas()):
        assert abs(got["delta"] - got["log_z_bias"] - exact) < 4 * got["se"], (got, exact)


def test_unfitted_tilt_is_the_base():
    p, q = lg.base_prior(), lg.posterior()
    tilt = HierarchicalTilt(lg.SIZES, hidden=(8,)).double()
    gains = group_gains(p, tilt, q.sample(100, generator=_gen(12)), 10, generator=_gen(13))
    assert all(g["delta"] == 0.0 and g["se"] == 0.0 for g in gains)


@pytest.mark.slow
def test_groupwise_sir_reproduces_the_tilted_joint_moments():
    z, ess = sample_groupwise_sir(lg.base_prior(), lg.quadratic_tilt(), 20_000, 500,
                                  generator=_gen(14))
    assert z.shape == (20_000, 4) and z.abs().max() < 8
    assert len(ess) == 2 and all(0 < e <= 1 for e in ess)
    _assert_moments(z, *lg.quadratic_joint_moments())


@pytest.mark.slow
def test_groupwise_mala_reproduces_the_tilted_joint_moments():
    z = sample_groupwise(lg.base_prior(), lg.quadratic_tilt(), 5000, _mala(),
                         generator=_gen(15))
    _assert_moments(z, *lg.quadratic_joint_moments())


@pytest.mark.slow
def test_groupwise_sampling_without_a_tilt_is_the_base():
    z = sample_groupwise(lg.base_prior(), None, 4000, _mala(60, 30), generator=_gen(16))
    p = lg.base_prior()
    ref = p.sample(200_000, generator=_gen(17))
    _assert_moments(z, ref.mean(0).numpy(), np.cov(ref.numpy().T))


@pytest.mark.slow
def test_whole_vector_mala_on_the_joint_energy_of_optimal_classifiers_targets_q():
    """With optimal classifiers every Z_k is 1, so the joint energy is exact: whole-vector MALA
    through the plain sampler interface reproduces the aggregate posterior."""
    energy = joint_energy(lg.base_prior(), lg.optimal_tilt())
    init = lg.base_prior().sample(5000, generator=_gen(18))
    sampler = LangevinSampler(LangevinSampler.Config(
        step_size=0.1, metropolis=True, adapt_step_size=True, adapt_per_chain=True))
    z = sampler.run(energy, init, 400, burn_in=200, generator=_gen(19), diagnose=False,
                    keep_info="summary").samples[-1]
    _assert_moments(z, *lg.posterior_joint_moments())


def test_the_test_can_fail_a_wrong_tilt_gives_wrong_moments():
    """The moment check rejects group-wise SIR under the optimal tilt against the quadratic
    tilt's moments (guards the checker itself)."""
    z, _ = sample_groupwise_sir(lg.base_prior(), lg.optimal_tilt(), 4000, 50, generator=_gen(20))
    with pytest.raises(AssertionError):
        _assert_moments(z, *lg.quadratic_joint_moments())


def test_bad_inputs_are_clear_errors():
    p = lg.base_prior()
    with pytest.raises(ConfigError, match="sum to"):
        check_group_sizes((2, 3), 4)
    with pytest.raises(ConfigError, match="positive integers"):
        HierarchicalTilt((2, 0))
    with pytest.raises(ConfigError, match="one classifier per group"):
        HierarchicalTilt(lg.SIZES, classifiers=[lg.OptimalRatio(0)])
    with pytest.raises(DataError, match="held-out latents"):
        group_gains(p, lg.optimal_tilt(), torch.zeros(10, 3, dtype=lg.DT))
    with pytest.raises(DataError, match="NaN"):
        fit_group_classifiers(p, lg.optimal_tilt(), torch.full((10, 4), float("nan"),
                                                               dtype=lg.DT))
    with pytest.raises(ConfigError, match="at least 2"):
        log_normalizer_per_context(p, lg.optimal_tilt(), 0, torch.zeros(3, 0, dtype=lg.DT), 1)


class _TiltedHierarchy:
    """What the group-wise sampler plugins look for: a ``tilt`` over a hierarchical
    ``base_prior`` (duck-typed, as a hier_ncp prior presents itself)."""

    def __init__(self, tilt):
        self.base_prior, self.tilt = lg.base_prior(), tilt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["groupwise_sir", "groupwise_langevin"])
def test_groupwise_sampler_plugins_reproduce_the_tilted_joint_moments(name, registry):
    import ncpvae

    fields = ({"num_candidates": 300} if name == "groupwise_sir" else
              {"metropolis": True, "step_size": 0.1, "adapt_step_size": True,
               "adapt_per_chain": True, "num_steps": 200, "burn_in": 100})
    sampler = ncpvae.create("sampler", name, registry=registry, **fields)
    result = sampler.sample_prior(_TiltedHierarchy(lg.quadratic_tilt()), 8000,
                                  generator=_gen(21))
    assert result.samples.shape == (1, 8000, 4)
    assert {k for k in result.diagnostics if k.endswith("group2")}
    _assert_moments(result.samples[-1], *lg.quadratic_joint_moments())
