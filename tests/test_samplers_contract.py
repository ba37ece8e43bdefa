"""Contract tests of the samplers (langevin ULA/MALA, sgld, sir): shapes, dtypes, determinism,
no-ops, chain independence, MALA bookkeeping, no retained graph, divergence handling, config
validation and registration."""

from __future__ import annotations

import math

import ncpvae_plugins.langevin as langevin_mod
import ncpvae_plugins.sgld as sgld_mod
import ncpvae_plugins.sir as sir_mod
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ncpvae_plugins.langevin import LangevinSampler
from ncpvae_plugins.sgld import MinibatchEnergy, SGLDSampler
from ncpvae_plugins.sir import SIRSampler
from pydantic import ValidationError
from torch import Tensor

from ncpvae import Sampler, SampleResult
from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.errors import ConfigError, DataError, NonFiniteError
from ncpvae.mcmc import apply_divergence_policy, energy_and_grad, langevin_move
from ncpvae.prior import Prior


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: threads only add overhead (and oversubscribe a shared CI box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyGaussian(Prior):
    """N(loc, scale^2 I) for tests (the built-in gaussian prior is tested elsewhere)."""

    name = "tiny_gaussian"

    def __init__(self, dim: int, loc: float = 0.0, scale: float = 1.0,
                 dtype: torch.dtype = torch.float64):
        super().__init__(dim)
        self.register_buffer("loc", torch.full((dim,), float(loc), dtype=dtype))
        self.register_buffer("scale", torch.full((dim,), float(scale), dtype=dtype))

    def log_prob(self, z: Tensor) -> Tensor:
        s = (z - self.loc) / self.scale
        return (-0.5 * s**2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(n, self.latent_dim, generator=generator, dtype=self.loc.dtype)
        return self.loc + self.scale * noise


def quartic(z: Tensor) -> Tensor:
    """A non-Gaussian, batch-separable test energy (C, D) -> (C,)."""
    return 0.25 * (z**4).sum(-1) + 0.5 * (z**2).sum(-1) + 0.3 * z.sum(-1)


def build(kind: str, **fields) -> Sampler:
    """Build a sampler the way the framework does: Config + from_config."""
    ctx = BuildContext()
    if kind == "ula":
        return LangevinSampler.from_config(LangevinSampler.Config(**{"step_size": 0.1, **fields}),
                                           ctx)
    if kind == "mala":
        cfg = LangevinSampler.Config(**{"step_size": 0.3, "metropolis": True, **fields})
        return LangevinSampler.from_config(cfg, ctx)
    if kind == "sgld":
        return SGLDSampler.from_config(SGLDSampler.Config(**{"a": 0.1, **fields}), ctx)
    if kind == "sir":
        return SIRSampler.from_config(SIRSampler.Config(**{"num_candidates": 3, **fields}), ctx)
    raise AssertionError(kind)


KINDS = ["ula", "mala", "sgld", "sir"]


def run(kind: str, sampler: Sampler, z0: Tensor, steps: int, **kw) -> SampleResult:
    if kind == "sir":
        kw.setdefault("proposal", TinyGaussian(z0.shape[1], dtype=z0.dtype))
    return sampler.run(quartic, z0, steps, **kw)


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, graphs


@settings(derandomize=True, max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), chains=st.integers(1, 6), dim=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), steps=st.integers(0, 4),
       thin=st.integers(1, 3))
def test_shapes_and_dtypes(kind, chains, dim, dtype, steps, thin):
    sampler = build(kind)
    z0 = torch.randn(chains, dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    result = run(kind, sampler, z0, steps, thin=thin, generator=torch.Generator().manual_seed(1))
    expected_draws = max(1, math.ceil(steps / thin))
    assert result.samples.shape == (expected_draws, chains, dim)
    assert result.samples.dtype == dtype
    assert result.samples.device == z0.device
    assert not result.samples.requires_grad and result.samples.grad_fn is None
    assert torch.isfinite(result.samples).all()
    for name, value in result.info.items():
        assert value.shape == (steps, chains), name
        assert not value.requires_grad, name
    if steps == 0:
        assert result.info == {}
    else:
        assert result.info["energy"].dtype == dtype
    assert result.diagnostics["num_chains"] == chains
    assert len(result.diagnostics["ess"]) == dim


@pytest.mark.parametrize("kind", ["ula", "mala", "sgld"])
def test_state_caches_energy_and_gradient_without_graph(kind):
    sampler = build(kind)
    z0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = sampler.init(z0, quartic)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        state, info = sampler.step(state, quartic, generator=g)
        u, grad = energy_and_grad(quartic, state.position)
        torch.testing.assert_close(state.energy, u, rtol=0, atol=0)
        torch.testing.assert_close(state.grad, grad, rtol=0, atol=0)
        for t in (*state, *info):
            if isinstance(t, Tensor):
                assert not t.requires_grad and t.grad_fn is None


def test_many_chains_on_a_cpu_are_evaluated_in_row_blocks(monkeypatch):
    """Above CPU_BLOCK_FROM chains, energy_and_grad calls the energy on near-equal row blocks
    of at most CPU_BLOCK_ROWS and returns the one-call function (closed-form gradient);
    at or below it, one call as before; a reducing energy's error names the caller's count."""
    from ncpvae.mcmc import kernels

    monkeypatch.setattr(kernels, "CPU_BLOCK_FROM", 20)
    monkeypatch.setattr(kernels, "CPU_BLOCK_ROWS", 8)
    seen: list[int] = []

    def energy(z):
        seen.append(z.shape[0])
        return quartic(z)

    z = torch.randn(21, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, grad = energy_and_grad(energy, z)
    assert seen == [7, 7, 7]
    torch.testing.assert_close(u, quartic(z), rtol=0, atol=0)
    torch.testing.assert_close(grad, z**3 + z + 0.3, rtol=1e-15, atol=1e-15)
    seen.clear()
    energy_and_grad(energy, z[:20])
    assert seen == [20]
    with pytest.raises(DataError, match=r"per-chain values \(C,\) = \(21,\), got \(\)"):
        energy_and_grad(lambda x: quartic(x).sum(), z)


def test_an_energy_marked_rows_indexed_is_never_split(monkeypatch):
    """One data point per chain (rows_indexed): all chains in one call, eager and compiled."""
    from ncpvae.mcmc import kernels
    from ncpvae.mcmc.fastpath import CompiledEnergy

    monkeypatch.setattr(kernels, "CPU_BLOCK_FROM", 20)
    monkeypatch.setattr(kernels, "CPU_BLOCK_ROWS", 8)
    data = torch.randn(21, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen: list[int] = []

    def energy(z):
        seen.append(z.shape[0])
        return quartic(z - data)  # row i needs data[i]: splitting the rows would misalign

    energy.rows_indexed = True
    z = torch.randn(21, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, grad = energy_and_grad(energy, z)
    assert seen == [21]
    torch.testing.assert_close(grad, (z - data)**3 + (z - data) + 0.3, rtol=1e-15, atol=1e-15)
    assert len(CompiledEnergy(energy, block_rows=8)._blocks(z)) == 1
    assert len(CompiledEnergy(quartic, block_rows=8)._blocks(z)) == 3


def test_run_settings_count_the_draws_they_keep():
    """num_kept (the size of the draw buffer) equals the number of steps keeps() selects."""
    from ncpvae.sampler import RunSettings

    for num_steps in (0, 1, 2, 7, 10):
        for burn_in in range(num_steps):
            for thin in (1, 2, 3, 11):
                settings = RunSettings(num_steps, burn_in, thin)
                kept = sum(settings.keeps(t) for t in range(1, num_steps + 1))
                assert settings.num_kept == kept, (num_steps, burn_in, thin)


def test_energy_parameters_get_no_gradient():
    net = torch.nn.Linear(3, 1).double()

    def energy(z):
        return 0.5 * (z**2).sum(-1) + net(z).squeeze(-1)

    result = build("mala").run(energy, torch.zeros(4, 3, dtype=torch.float64), 3)
    assert all(p.grad is None for p in net.parameters())
    assert result.samples.grad_fn is None


@pytest.mark.parametrize("kind", ["ula", "mala", "sgld"])
def test_one_energy_evaluation_per_step(kind):
    calls = []

    def energy(z):
        calls.append(z.shape)
        return quartic(z)

    build(kind).run(energy, torch.zeros(7, 2, dtype=torch.float64), 6)
    assert len(calls) == 1 + 6  # init + one per step (the gradient is cached)
    assert all(shape == (7, 2) for shape in calls)


def test_energy_that_reduces_over_chains_is_rejected():
    with pytest.raises(DataError, match=r"\(C,\)"):
        build("ula").run(lambda z: quartic(z).mean(), torch.zeros(4, 2), 2)


def test_bad_initial_positions_are_rejected():
    with pytest.raises(DataError, match="shape"):
        build("ula").run(quartic, torch.zeros(4), 2)
    with pytest.raises(DataError, match="NaN"):
        build("ula").run(quartic, torch.full((2, 2), math.nan), 2)
    with pytest.raises(NonFiniteError, match="initial position"):
        build("mala").run(lambda z: quartic(z) + torch.log(z[:, 0] - 1.0), torch.ones(2, 2), 1)


# ---------------------------------------------------------------------------------------------
# determinism and no-ops


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_runs_are_bit_for_bit_reproducible(kind):
    z0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = run(kind, build(kind), z0, 12, generator=torch.Generator().manual_seed(7))
    b = run(kind, build(kind), z0, 12, generator=torch.Generator().manual_seed(7))
    c = run(kind, build(kind), z0, 12, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.samples, b.samples)
    assert all(torch.equal(a.info[k], b.info[k]) for k in a.info)
    assert not torch.equal(a.samples, c.samples)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_steps_is_a_no_op(kind):
    z0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = run(kind, build(kind), z0, 0)
    assert result.samples.shape == (1, 5, 2)
    assert torch.equal(result.samples[0], z0)


@pytest.mark.parametrize("kind, fields", [("ula", {"step_size": 0.0}),
                                          ("mala", {"step_size": 0.0}),
                                          ("sgld", {"a": 0.0})])
def test_zero_step_size_is_a_no_op(kind, fields):
    z0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = run(kind, build(kind, **fields), z0, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(result.samples, z0.expand(4, 5, 2))
    if "acceptance_rate" in result.info:
        assert torch.equal(result.info["acceptance_rate"], torch.ones(4, 5, dtype=torch.float64))


def test_thinning_keeps_the_final_state():
    final = {}
    result = build("ula").run(quartic, torch.zeros(3, 2), 10, burn_in=2, thin=3,
                              callback=lambda t, s, i: final.update(t=t, z=s.position))
    assert result.samples.shape[0] == math.ceil((10 - 2) / 3)
    assert final["t"] == 10 and torch.equal(result.samples[-1], final["z"])


# ---------------------------------------------------------------------------------------------
# chain independence: chain i's trajectory is the same alone or inside a batch, given the same
# per-chain noise. Noise comes from a table indexed by (draw number, chain id).


class TableNoise:
    """Per-chain noise: draw k of chain i is a fixed function of (k, i), whoever else runs."""

    def __init__(self, rows: list[int]):
        self.rows = torch.tensor(rows)
        self.count = 0

    def _table(self, like: Tensor, uniform: bool) -> Tensor:
        # the chain axis is the last of (K + 1, C) (sir's Gumbel draws), else the first
        g = torch.Generator().manual_seed(1000 + self.count)
        self.count += 1
        chain_axis = 1 if uniform and like.ndim == 2 else 0
        shape = list(like.shape)
        shape[chain_axis] = 50
        full = (torch.rand if uniform else torch.randn)(shape, generator=g, dtype=like.dtype)
        return full.index_select(chain_axis, self.rows)


def with_table_noise(sampler: Sampler, rows: list[int]) -> Sampler:
    noise = TableNoise(rows)
    sampler._randn = lambda like, generator, dim=0: noise._table(like, uniform=False)
    sampler._rand = lambda like, generator, dim=0: noise._table(like, uniform=True)
    return sampler


class TableProposal(TinyGaussian):
    """A proposal whose k-th candidate for chain i depends on (call, k, i) only."""

    def __init__(self, dim: int, rows: list[int], per_chain: int):
        super().__init__(dim)
        self.rows, self.per_chain, self.count = torch.tensor(rows), per_chain, 0

    def sample(self, n, *, generator=None):
        g = torch.Generator().manual_seed(5000 + self.count)
        self.count += 1
        full = torch.randn(self.per_chain, 50, self.latent_dim, generator=g, dtype=torch.float64)
        return full[:, self.rows].reshape(n, self.latent_dim)


def trajectories(kind: str, rows: list[int], z_all: Tensor, steps: int) -> Tensor:
    sampler = with_table_noise(build(kind), rows)
    kw = {}
    if kind == "sir":
        kw["proposal"] = TableProposal(z_all.shape[1], rows, sampler.config.num_candidates)
    return sampler.run(quartic, z_all[rows], steps, **kw).samples


@pytest.mark.parametrize("kind", KINDS)
def test_chains_are_independent_of_the_batch(kind):
    z_all = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batch_rows = [4, 9, 17, 23, 31, 42]
    together = trajectories(kind, batch_rows, z_all, 8)
    for j, i in enumerate(batch_rows):
        alone = trajectories(kind, [i], z_all, 8)
        torch.testing.assert_close(alone[:, 0], together[:, j], rtol=1e-12, atol=1e-12)


def test_independence_check_catches_a_mean_reduced_gradient(monkeypatch):
    """The check above can fail: a kernel using grad(U.mean()) couples step size and C."""

    def mean_grad(energy, position):
        z = position.detach().requires_grad_(True)
        u = energy(z)
        (g,) = torch.autograd.grad(u.mean(), z)
        return u.detach(), g

    monkeypatch.setattr(langevin_mod, "energy_and_grad", mean_grad)
    z_all = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    together = trajectories("ula", [4, 9, 17], z_all, 8)
    alone = trajectories("ula", [4], z_all, 8)
    assert not torch.allclose(alone[:, 0], together[:, 0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MALA bookkeeping


def test_mala_rejection_leaves_the_state_unchanged_and_acceptance_moves_it():
    sampler = build("mala", step_size=2.0)  # large: many rejections on the quartic
    state = sampler.init(torch.randn(400, 2, generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64), quartic)
    g = torch.Generator().manual_seed(1)
    seen_reject = seen_accept = 0
    for _ in range(5):
        new, info = sampler.step(state, quartic, generator=g)
        rej = ~info.is_accepted
        assert torch.equal(new.position[rej], state.position[rej])
        assert torch.equal(new.energy[rej], state.energy[rej])
        assert torch.equal(new.grad[rej], state.grad[rej])
        assert not torch.equal(new.position[~rej], state.position[~rej]) or (~rej).sum() == 0
        assert ((info.acceptance_rate >= 0) & (info.acceptance_rate <= 1)).all()
        seen_reject += int(rej.sum())
        seen_accept += int((~rej).sum())
        state = new
    assert seen_reject > 0 and seen_accept > 0


def test_mala_treats_a_nonfinite_proposal_as_a_rejection():
    def walled(z):  # +inf beyond |z| > 1.5
        u = 0.5 * (z**2).sum(-1)
        return torch.where(z.abs().max(-1).values > 1.5, torch.full_like(u, math.inf), u)

    result = build("mala", step_size=1.0).run(walled, torch.zeros(500, 2, dtype=torch.float64),
                                              20, generator=torch.Generator().manual_seed(0))
    assert result.diagnostics["num_nonfinite"] > 0
    assert (result.samples.abs() <= 1.5).all()
    assert not result.info["is_accepted"][result.info["nonfinite"]].any()


# ---------------------------------------------------------------------------------------------
# divergence


@pytest.mark.parametrize("kind, fields, label", [("ula", {"step_size": 10.0}, "step_size=10"),
                                                 ("sgld", {"a": 10.0, "gamma": 0.0},
                                                  "step_size=10")])
def test_divergence_raises_naming_step_and_step_size(kind, fields, label):
    gauss = TinyGaussian(2)
    with pytest.raises(NonFiniteError) as err:
        build(kind, **fields).run(gauss.energy, torch.ones(8, 2, dtype=torch.float64), 1000)
    message = str(err.value)
    assert label in message and "step " in message and "smaller" in message


@pytest.mark.parametrize("kind, fields", [("ula", {"step_size": 10.0}),
                                          ("sgld", {"a": 10.0, "gamma": 0.0})])
def test_reset_mode_counts_and_keeps_chains_finite(kind, fields):
    gauss = TinyGaussian(2)
    result = build(kind, on_nonfinite="reset", **fields).run(
        gauss.energy, torch.ones(8, 2, dtype=torch.float64), 400,
        generator=torch.Generator().manual_seed(0))
    assert result.diagnostics["num_nonfinite"] > 0
    assert result.diagnostics["num_nonfinite"] == int(result.info["nonfinite"].sum())
    assert torch.isfinite(result.samples).all()


# ---------------------------------------------------------------------------------------------
# step-size adaptation


def test_adaptation_reaches_the_target_during_burn_in_and_then_freezes():
    sampler = build("mala", step_size=0.01, adapt_step_size=True)
    gauss = TinyGaussian(10)
    result = sampler.run(gauss.energy, torch.zeros(256, 10, dtype=torch.float64), 500,
                         burn_in=400, generator=torch.Generator().manual_seed(0))
    eps = result.info["step_size"]
    assert torch.all(eps[400:] == eps[400, 0])  # frozen, one value per run
    assert not torch.all(eps[:400] == eps[0, 0])  # it did adapt
    assert abs(result.diagnostics["acceptance_rate"] - 0.574) < 0.05


def test_per_chain_adaptation_gives_each_chain_its_step_size():
    sampler = build("mala", step_size=0.05, adapt_step_size=True, adapt_per_chain=True)
    result = sampler.run(quartic, torch.zeros(32, 2, dtype=torch.float64), 60, burn_in=50,
                         generator=torch.Generator().manual_seed(0))
    final = result.info["step_size"][-1]
    assert final.unique().numel() > 1
    assert torch.equal(result.info["step_size"][50:], final.expand(10, 32))


def test_adaptation_needs_burn_in():
    with pytest.raises(ConfigError, match="burn_in"):
        build("mala", adapt_step_size=True).run(quartic, torch.zeros(2, 2), 10)


# ---------------------------------------------------------------------------------------------
# SGLD schedule and minibatch energies


def test_sgld_step_schedule():
    sampler = build("sgld", a=0.2, b=3.0, gamma=0.75)
    result = sampler.run(quartic, torch.zeros(2, 2, dtype=torch.float64), 6)
    expected = torch.tensor([0.2 * (3.0 + t) ** -0.75 for t in range(6)], dtype=torch.float64)
    torch.testing.assert_close(result.info["step_size"][:, 0], expected, rtol=1e-15, atol=0)


def test_minibatch_energy_is_unbiased_and_per_chain():
    data = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def nll(z, batch):  # z (C, D), batch (C, n, D) -> (C, n)
        return 0.5 * ((batch - z.unsqueeze(1)) ** 2).sum(-1)

    est = MinibatchEnergy(nll, data, 5, prior_energy=lambda z: 0.5 * (z**2).sum(-1),
                          generator=torch.Generator().manual_seed(1))
    z = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    draws = torch.stack([est(z) for _ in range(4000)])  # (R, C)
    full = est.full(z)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - full).abs() / se < 5).all()
    # each chain draws its own minibatch: the two chains' estimates are not perfectly coupled
    assert abs(float(torch.corrcoef(draws.T)[0, 1])) < 0.9
    with pytest.raises(DataError, match=r"\(C, n\)"):
        MinibatchEnergy(lambda z, b: nll(z, b).sum(-1), data, 5)(z)


def test_sgld_runs_on_a_minibatch_energy():
    data = torch.randn(40, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def nll(z, batch):
        return 0.5 * ((batch - z.unsqueeze(1)) ** 2).sum(-1)

    est = MinibatchEnergy(nll, data, 4, generator=torch.Generator().manual_seed(1))
    result = build("sgld", a=0.001, gamma=0.0).run(est, torch.zeros(3, 1, dtype=torch.float64),
                                                   5, generator=torch.Generator().manual_seed(2))
    assert result.samples.shape == (5, 3, 1)


# ---------------------------------------------------------------------------------------------
# config, options, registration, sample_prior


def test_config_bounds_and_messages():
    with pytest.raises(ValidationError):
        LangevinSampler.Config(step_size=-0.1)
    with pytest.raises(ValidationError, match="burn_in"):
        LangevinSampler.Config(num_steps=5, burn_in=5)
    with pytest.raises(ValidationError, match="gamma"):
        SGLDSampler.Config(gamma=0.4)
    with pytest.raises(ValidationError):
        SIRSampler.Config(num_candidates=0)
    with pytest.raises(ConfigError, match="step_size"):
        LangevinSampler(step_size=-1.0)
    with pytest.raises(ConfigError, match="burn_in"):
        build("ula").run(quartic, torch.zeros(2, 2), 5, burn_in=5)
    with pytest.raises(ConfigError, match="proposal"):
        build("ula").run(quartic, torch.zeros(2, 2), 5, proposal=None)
    with pytest.raises(ConfigError, match="proposal"):
        build("sir").run(quartic, torch.zeros(2, 2), 5)


def test_callback_and_progress(capsys):
    steps = []
    build("ula").run(quartic, torch.zeros(3, 2), 4, callback=lambda t, s, i: steps.append(t),
                     progress=True)
    assert steps == [1, 2, 3, 4]
    assert "langevin" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ula", "mala", "sgld"])
def test_sample_prior_for_mcmc_samplers(kind):
    sampler = build(kind, num_steps=6, burn_in=2, thin=2)
    result = sampler.sample_prior(TinyGaussian(3), 11, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (2, 11, 3)
    assert result.samples[-1].shape == (11, 3)
    assert result.diagnostics["num_steps"] == 6


def test_sample_prior_for_sir():
    prior = TinyGaussian(2, loc=0.5)
    result = build("sir", num_candidates=20).sample_prior(
        prior, 100, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (1, 100, 2)
    assert 0 < result.diagnostics["ess_fraction"] <= 1 + 1e-12
    assert result.diagnostics["num_candidates"] == 2000
    # target == proposal: all weights equal
    assert result.diagnostics["ess_fraction"] == pytest.approx(1.0)
    other = build("sir", num_candidates=20).sample_prior(
        prior, 100, proposal=TinyGaussian(2, scale=2.0), generator=torch.Generator().manual_seed(0))
    assert other.diagnostics["ess_fraction"] < 0.9


def test_plugins_register_their_samplers():
    assert langevin_mod.ncpvae_register_samplers() == [LangevinSampler]
    assert sgld_mod.ncpvae_register_samplers() == [SGLDSampler]
    assert sir_mod.ncpvae_register_samplers() == [SIRSampler]
    from ncpvae.plugin_manager import PluginManager

    registry = PluginManager(builtins=False, entrypoints=False,
                             plugins=[langevin_mod, sgld_mod, sir_mod]).registry
    assert registry.names("sampler") == ["langevin", "sgld", "sir"]
    for cls in (LangevinSampler, SGLDSampler, SIRSampler):
        assert cls.Config().name == cls.name


def test_posterior_energy_needs_one_chain_per_image():
    from ncpvae.mcmc.targets import posterior_energy

    class Tiny(torch.nn.Module):
        def decode(self, z):
            return z.reshape(-1, 1, 1, z.shape[-1])

        def recon_log_prob(self, x, params):
            return -0.5 * ((x - params) ** 2).flatten(1).sum(1)

    energy = posterior_energy(Tiny(), TinyGaussian(2), torch.zeros(3, 1, 1, 2))
    assert energy(torch.zeros(3, 2)).shape == (3,)
    with pytest.raises(DataError, match="3 chains"):
        energy(torch.zeros(4, 2))
    result = build("mala").run(energy, torch.zeros(3, 2, dtype=torch.float64), 3)
    assert result.samples.shape == (3, 3, 2)


# ---------------------------------------------------------------------------------------------
# self-description and the shared kernels


def test_samplers_describe_themselves():
    assert build("ula").label == "ULA" and build("mala").label == "MALA"
    assert build("sgld").label == "SGLD" and build("sir").label == "SIR"
    assert build("mala").acceptance_note is None
    assert "would-be MH acceptance" in build("ula", adapt_step_size=True).acceptance_note
    assert build("ula").acceptance_note  # plain ULA reports 1 per finite move: say so
    assert build("sgld").acceptance_note is None and build("sir").acceptance_note is None

    class Custom(Sampler):
        name = "custom"

        class Config(ComponentConfig):
            name: str = "custom"

        def init(self, position, energy, **options):
            raise NotImplementedError

        def step(self, state, energy, *, generator=None, **options):
            raise NotImplementedError

    assert Custom().label == "custom" and Custom().acceptance_note is None


def test_langevin_move_scalar_and_per_chain_forms_agree():
    gen = torch.Generator().manual_seed(0)
    z, g, xi = (torch.randn(50, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    eps = 0.07
    by_chain = langevin_move(z, g, torch.full((50,), eps, dtype=torch.float64), xi)
    shared = langevin_move(z, g, eps, xi)
    expected = z - eps * g + math.sqrt(2 * eps) * xi
    torch.testing.assert_close(by_chain, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(shared, expected, rtol=0, atol=1e-14)
    tempered = langevin_move(z, g, eps, xi, 0.5)
    torch.testing.assert_close(tempered, z - eps * g + 0.5 * xi, rtol=0, atol=1e-14)


def test_divergence_policy_raise_and_reset():
    ok = torch.tensor([True, False, True])
    new = (torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, math.nan, 3.0]))
    old = (torch.zeros(3, 2), torch.zeros(3))
    assert apply_divergence_policy(torch.ones(3, dtype=torch.bool), new, old,
                                   on_nonfinite="raise", message=str)[0] is new[0]
    with pytest.raises(NonFiniteError, match="1 bad"):
        apply_divergence_policy(ok, new, old, on_nonfinite="raise",
                                message=lambda bad: f"{int(bad.sum())} bad")
    pos, u = apply_divergence_policy(ok, new, old, on_nonfinite="reset", message=str)
    assert pos[1].tolist() == [0.0, 0.0] and u.tolist() == [1.0, 0.0, 3.0]
    assert pos[2].tolist() == [4.0, 5.0]


# ---------------------------------------------------------------------------------------------
# importance resampling above torch.multinomial's 2^24 categories


def test_resampling_splits_above_the_multinomial_limit(monkeypatch):
    import ncpvae.mcmc.importance as importance

    limit, m, n = 7, 20, 200_000
    original = torch.multinomial
    calls = []

    def limited(probs, num_samples, *args, **kwargs):  # torch's limit, scaled down
        calls.append(probs.numel())
        if probs.numel() > limit:
            raise RuntimeError("number of categories cannot exceed the limit")
        return original(probs, num_samples, *args, **kwargs)

    monkeypatch.setattr(importance, "MULTINOMIAL_MAX_CATEGORIES", limit)
    monkeypatch.setattr(torch, "multinomial", limited)
    log_w = torch.log(torch.arange(1.0, m + 1, dtype=torch.float64))  # p_i ∝ i
    candidates = torch.arange(float(m), dtype=torch.float64).unsqueeze(-1)
    draws, _ = importance.importance_resample(candidates, log_w, n, generator=gen_(0))
    assert max(calls) <= limit and len(calls) == 1 + 3  # blocks of 7, 7, 6
    counts = torch.bincount(draws.squeeze(-1).long(), minlength=m).double()
    p = torch.arange(1.0, m + 1, dtype=torch.float64) / (m * (m + 1) / 2)
    se = torch.sqrt(n * p * (1 - p))
    assert ((counts - n * p).abs() < 5 * se).all()  # each of 20 cells within 5 binomial SEs
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 43.8  # chi-square with 19 dof, 0.999 quantile


def gen_(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_resampling_below_the_limit_is_one_multinomial_call():
    from ncpvae.mcmc.importance import importance_resample

    log_w = torch.randn(50, dtype=torch.float64, generator=gen_(1))
    candidates = torch.arange(50.0).unsqueeze(-1)
    draws, _ = importance_resample(candidates, log_w, 30, generator=gen_(2))
    index = torch.multinomial(torch.softmax(log_w, 0), 30, replacement=True, generator=gen_(2))
    assert torch.equal(draws.squeeze(-1), index.float())


@pytest.mark.slow
def test_resampling_more_than_2_pow_24_candidates():
    from ncpvae.mcmc.importance import importance_resample

    m = (1 << 24) + 1000
    log_w = torch.full((m,), -math.inf, dtype=torch.float64)
    log_w[:1000] = 0.0  # half the mass in the first block, half past 2^24
    log_w[-1000:] = 0.0
    candidates = torch.zeros(m, 1)
    candidates[-1000:] = 1.0
    draws, ess = importance_resample(candidates, log_w, 4000, generator=gen_(3))
    assert ess == pytest.approx(2000 / m)
    share = float(draws.mean())  # fraction drawn past 2^24: Binomial(4000, 1/2) / 4000
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / 4000)


# ---------------------------------------------------------------------------------------------
# run(): streamed info, optional diagnostics, deferred divergence checks


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_info_gives_the_same_numbers_as_full_info(kind):
    fields = {"adapt_step_size": True} if kind in ("ula", "mala") else {}
    if kind in ("ula", "sgld"):
        fields["on_nonfinite"] = "reset"  # adapted ULA may overshoot on the quartic: count it
    sampler = build(kind, **fields)
    gauss = TinyGaussian(3)
    opts = {"proposal": gauss} if kind == "sir" else {}
    z0 = gauss.sample(5, generator=gen_(4))
    full = sampler.run(quartic, z0, 150, burn_in=70, thin=10, generator=gen_(5), **opts)
    summ = sampler.run(quartic, z0, 150, burn_in=70, thin=10, generator=gen_(5),
                       keep_info="summary", **opts)
    assert torch.equal(full.samples, summ.samples)  # the chains themselves do not change
    for field, values in full.info.items():
        assert summ.info[field].shape == (150,)
        torch.testing.assert_close(summ.info[field], values.double().mean(1))
        torch.testing.assert_close(summ.info[field + "_chain_mean"],
                                   values[70:].double().mean(0))
    skip = {"wall_time_s", "chain_steps_per_s", "acceptance", "acceptance_rate"}
    assert {k: v for k, v in full.diagnostics.items() if k not in skip} == {
        k: v for k, v in summ.diagnostics.items() if k not in skip}
    if "acceptance" in full.diagnostics:
        for key, value in full.diagnostics["acceptance"].items():
            assert summ.diagnostics["acceptance"][key] == pytest.approx(value, rel=1e-12)


def test_diagnose_false_skips_ess_and_rhat():
    result = build("mala").run(quartic, torch.zeros(4, 2, dtype=torch.float64), 30,
                               generator=gen_(0), diagnose=False)
    assert "ess" not in result.diagnostics and "rhat" not in result.diagnostics
    assert result.diagnostics["num_draws"] == 30 and "acceptance_rate" in result.diagnostics


@pytest.mark.parametrize("kind, fields", [("ula", {"step_size": 0.9}),
                                          ("sgld", {"a": 0.9, "gamma": 0.0})])
@pytest.mark.parametrize("check_every", [7, 1000])
def test_deferred_divergence_check_names_the_first_bad_step(kind, fields, check_every):
    # a steep quartic from a spread start: some chain blows up after a few steps
    z0 = torch.linspace(0.5, 3.0, 8, dtype=torch.float64).unsqueeze(-1).repeat(1, 2)
    with pytest.raises(NonFiniteError) as now:
        build(kind, **fields).run(quartic, z0, 200, generator=gen_(1))
    with pytest.raises(NonFiniteError) as later:
        build(kind, **fields).run(quartic, z0, 200, generator=gen_(1), check_every=check_every)
    assert str(later.value) == str(now.value) and "step " in str(now.value)
    reset = [build(kind, on_nonfinite="reset", **fields).run(
        quartic, z0, 60, generator=gen_(1), check_every=every) for every in (1, check_every)]
    assert torch.equal(reset[0].samples, reset[1].samples)
    assert reset[0].diagnostics["num_nonfinite"] == reset[1].diagnostics["num_nonfinite"] > 0


def test_run_rejects_bad_new_options():
    sampler = build("mala")
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ConfigError, match="keep_info"):
        sampler.run(quartic, z0, 5, keep_info="some")
    with pytest.raises(ConfigError, match="check_every"):
        sampler.run(quartic, z0, 5, check_every=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steps_do_not_synchronise_with_the_device():
    from ncpvae.mcmc import deferred_divergence

    z0 = torch.randn(64, 3, device="cuda", dtype=torch.float64)
    g = torch.Generator(device="cuda").manual_seed(0)
    for kind, fields in (("mala", {}), ("ula", {}), ("sgld", {}),
                         ("ula", {"adapt_step_size": True})):
        sampler = build(kind, **fields)
        state = sampler.init(z0, quartic)
        sampler.step(state, quartic, generator=g)  # warm-up (caches, lazy CUDA init)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with deferred_divergence():  # what run() uses when check_every > 1
                for t in range(1, 6):
                    state, info = sampler.step(state, quartic, generator=g)
                    state = sampler.adapt(state, info, iteration=t, num_adapt=10)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_streamed_info_with_small_blocks(monkeypatch):
    from ncpvae.sampler import _InfoStream

    sampler = build("mala", adapt_step_size=True)
    z0 = torch.zeros(5, 2, dtype=torch.float64)
    full = sampler.run(quartic, z0, 40, burn_in=13, generator=gen_(2))
    monkeypatch.setattr(_InfoStream, "BLOCK_CHAIN_STEPS", 12)  # blocks of 2 steps at 5 chains
    summ = sampler.run(quartic, z0, 40, burn_in=13, generator=gen_(2), keep_info="summary")
    for field, values in full.info.items():
        torch.testing.assert_close(summ.info[field], values.double().mean(1))
        torch.testing.assert_close(summ.info[field + "_chain_mean"], values[13:].double().mean(0))


# ---------------------------------------------------------------------------------------------
# the opt-in oneDNN fast path for linear layers


onednn = pytest.mark.skipif(not __import__("ncpvae.mcmc.fastpath", fromlist=["x"])
                            .onednn_available(), reason="torch without oneDNN")


def _mlp_energy(dim: int, dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    net = net.to(dtype).requires_grad_(False)
    return lambda z: 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)


@onednn
def test_onednn_linear_agrees_with_the_default_path_and_is_restored(monkeypatch):
    import torch.nn.functional as F

    import ncpvae.mcmc.fastpath.linear as fastpath

    calls = []
    real = fastpath._onednn_mm
    monkeypatch.setattr(fastpath, "_onednn_mm", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 1)).requires_grad_(False)

    def energy(z):
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    z = torch.randn(fastpath._MIN_ONEDNN_ROWS, 16, generator=gen_(0))
    u, g = energy_and_grad(energy, z)
    original = F.linear
    with fastpath.onednn_linear() as active:
        u_fast, g_fast = energy_and_grad(energy, z)
    # oneDNN for the wide layer (16 -> 64), forward and backward; the one-output layer keeps
    # MKL forward and a broadcast product backward
    assert active and F.linear is original and len(calls) == 2
    torch.testing.assert_close(u_fast, u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, g, rtol=1e-5, atol=1e-5)
    calls.clear()
    with fastpath.onednn_linear():  # few rows: no oneDNN call (its fixed cost would dominate)
        torch.testing.assert_close(energy_and_grad(energy, z[:64])[1], g[:64], rtol=1e-5,
                                   atol=1e-5)
    assert not calls
    energy64 = _mlp_energy(5, torch.float64)  # not eligible: falls back, bit for bit
    with fastpath.onednn_linear():
        u64 = energy_and_grad(energy64, z[:, :5].double())
    assert not calls and torch.equal(u64[0], energy_and_grad(energy64, z[:, :5].double())[0])
    with fastpath.onednn_linear(enabled=False) as active:
        assert not active and F.linear is original
    with fastpath.onednn_linear(), fastpath.onednn_linear():  # nested; torch is never patched
        assert F.linear is original and energy_and_grad(energy, z) and len(calls) == 2
    assert F.linear is original


@onednn
@pytest.mark.parametrize(("rows", "n_in", "n_out"), [(300, 3, 40), (300, 40, 1), (300, 40, 24),
                                                     (2048, 20, 24), (2048, 7, 1)])
def test_fast_linear_input_gradient_matches_autograd_for_every_shape_rule(rows, n_in, n_out):
    # narrow input (grad computed transposed), one output (broadcast product), MKL and oneDNN
    # products: each input gradient equals autograd's through the plain layer
    layer = torch.nn.Linear(n_in, n_out).requires_grad_(False)
    x = torch.randn(rows, n_in, generator=gen_(3))
    weights = torch.randn(rows, n_out, generator=gen_(4))

    def energy(z):
        return (layer(z) * weights).sum(-1)

    u, g = energy_and_grad(energy, x)
    with __import__("ncpvae.mcmc.fastpath", fromlist=["x"]).onednn_linear():
        u_fast, g_fast = energy_and_grad(energy, x)
    assert g_fast.shape == g.shape and g_fast.is_contiguous()
    torch.testing.assert_close(u_fast, u, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_fast, g, rtol=1e-5, atol=1e-5)


@onednn
def test_mala_with_onednn_linear_keeps_a_gaussian_target():
    # U(z) = |A z|^2 / 2 through a bias-free Linear layer: the target is N(0, (A^T A)^-1).
    a = torch.tensor([[1.5, 0.0, 0.0], [0.6, 1.0, 0.0], [0.0, -0.4, 0.7]])
    layer = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)
    layer.weight.copy_(a)
    cov = torch.linalg.inv(a.T @ a).double()
    n = 4000
    start = (torch.randn(n, 3, generator=gen_(1), dtype=torch.float64)
             @ torch.linalg.cholesky(cov).T).float()  # exact draws: MALA must keep this law
    sampler = LangevinSampler(step_size=0.2, metropolis=True)
    result = sampler.run(lambda z: 0.5 * (layer(z) ** 2).sum(-1), start, 60, generator=gen_(2),
                         fast_linear=True, keep_info="summary", thin=60, diagnose=False)
    z = result.samples[-1].double()
    emp = z.T @ z / n
    se = torch.sqrt((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n)
    assert ((emp - cov).abs() < 5 * se).all()
    assert (z.mean(0).abs() < 5 * torch.sqrt(cov.diagonal() / n)).all()
    assert 0.2 < result.diagnostics["acceptance_rate"] < 1.0
