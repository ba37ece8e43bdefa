"""``compile_energy`` / :class:`CompiledEnergy` and the ``value_and_grad`` energy protocol: the
compiled value and gradient agree with autograd to float32 rounding, MALA chains follow the
eager ones, a failed compilation falls back to the eager numbers with one warning, and any
energy object with its own ``value_and_grad`` is used as given (and checked)."""

from __future__ import annotations

import pytest
import torch
from ncpvae_plugins.langevin import LangevinSampler

from ncpvae import CompiledEnergy, ConfigError, DataError, energy_and_grad


def _mlp_energy():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
    net.requires_grad_(False)

    def energy(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    return energy


def _mala() -> LangevinSampler:
    return LangevinSampler(LangevinSampler.Config(step_size=0.1, metropolis=True))


def _start() -> torch.Tensor:
    return torch.randn(128, 3, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow  # torch.compile
def test_compiled_energy_matches_autograd_and_eager_chains():
    energy = _mlp_energy()
    z = _start()
    compiled = CompiledEnergy(energy)
    u, g = energy_and_grad(compiled, z)
    u_ref, g_ref = energy_and_grad(energy, z)
    assert compiled.failure is None
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    fast = _mala().run(energy, z, 30, generator=torch.Generator().manual_seed(2),
                       compile_energy=True)
    eager = _mala().run(energy, z, 30, generator=torch.Generator().manual_seed(2))
    # float32 rounding of fused kernels only: the same accept decisions, positions within 1e-4
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # torch.compile
def test_compiled_energy_with_fast_linear_matches_autograd_and_eager_chains(recwarn):
    from ncpvae.mcmc import fastpath

    if not fastpath.onednn_available():
        pytest.skip("torch without oneDNN")
    # a wide layer with enough rows for the oneDNN operator inside the compiled graph, a
    # narrow input and a single output for the two transposed/broadcast gradient rules
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32),
                              torch.nn.SiLU(), torch.nn.Linear(32, 1)).requires_grad_(False)

    def energy(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    z = torch.randn(fastpath._MIN_ONEDNN_ROWS, 4, generator=torch.Generator().manual_seed(1))
    compiled = CompiledEnergy(energy, fast_linear=True)
    u, g = compiled.value_and_grad(z)
    u_ref, g_ref = energy_and_grad(energy, z)
    assert compiled.failure is None
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    start = torch.randn(128, 4, generator=torch.Generator().manual_seed(3))
    fast = _mala().run(energy, start, 20, generator=torch.Generator().manual_seed(2),
                       compile_energy=True, fast_linear=True)
    eager = _mala().run(energy, start, 20, generator=torch.Generator().manual_seed(2))
    assert not [w for w in recwarn if "compile_energy" in str(w.message)]
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)


def test_compiled_energy_in_row_blocks_matches_autograd_and_validates_its_option():
    energy = _mlp_energy()
    z = torch.randn(250, 3, generator=torch.Generator().manual_seed(4))
    compiled = CompiledEnergy(energy, block_rows=100)
    assert [b.shape[0] for b in compiled._blocks(z)] == [84, 83, 83]
    assert len(CompiledEnergy(energy, block_rows=None)._blocks(z)) == 1
    u, g = compiled.value_and_grad(z)
    u_ref, g_ref = energy_and_grad(energy, z)
    assert compiled.failure is None and u.shape == (250,) and g.shape == (250, 3)
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match=r"block_rows must be a positive integer or None, "
                           rf"got {bad!r}"):
            CompiledEnergy(energy, block_rows=bad)


def test_failed_compilation_warns_once_and_gives_the_eager_numbers(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    energy = _mlp_energy()
    with pytest.warns(RuntimeWarning, match=r"compile_energy: .*RuntimeError: no C\+\+ "
                      r"compiler found\); sampling continues without it") as record:
        fast = _mala().run(energy, _start(), 10, generator=torch.Generator().manual_seed(2),
                           compile_energy=True)
    assert len([w for w in record if "compile_energy" in str(w.message)]) == 1
    eager = _mala().run(energy, _start(), 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.samples, eager.samples)


class _AnalyticGaussian:
    """U(z) = |z|^2 / 2 with its gradient given, counting the calls."""

    def __init__(self, grad_shape_bug: bool = False):
        self.calls = 0
        self.grad_shape_bug = grad_shape_bug

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z * z).sum(-1)

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self(z), (z[:, :1] if self.grad_shape_bug else z.clone())


def test_an_energy_with_its_own_value_and_grad_is_used_and_checked():
    energy = _AnalyticGaussian()
    result = _mala().run(energy, _start(), 5, generator=torch.Generator().manual_seed(3))
    assert energy.calls == 6  # the start and one proposal per step
    assert torch.isfinite(result.samples).all()
    with pytest.raises(DataError, match=r"value_and_grad must return the gradient with the "
                       r"positions' shape \(128, 3\), got \(128, 1\)"):
        energy_and_grad(_AnalyticGaussian(grad_shape_bug=True), _start())


def test_sampler_config_fast_paths_reach_sample_prior_and_leave_the_prior_trainable():
    # the fast paths as config fields: sample_prior freezes the prior's weights while sampling
    # (so fast_linear applies to them), follows the default chains up to float32 rounding, and
    # gives the weights back their requires_grad
    from ncpvae_plugins.gaussian import GaussianPrior
    from ncpvae_plugins.ncp import MLPClassifier, NCPPrior

    torch.manual_seed(0)
    prior = NCPPrior(GaussianPrior(3), MLPClassifier(3, hidden=(32, 32)), fitted=True)
    config = {"step_size": 0.2, "metropolis": True, "num_steps": 12, "burn_in": 2, "thin": 5}
    plain = LangevinSampler(LangevinSampler.Config(**config))
    fast = LangevinSampler(LangevinSampler.Config(**config, fast_linear=True,
                                                  compile_energy=True))
    assert plain.fast_paths() == {"fast_linear": False, "compile_energy": False}
    assert fast.fast_paths() == {"fast_linear": True, "compile_energy": True}
    seen = []
    real_run = LangevinSampler.run

    def spy(self, energy, *args, **kwargs):
        seen.append((kwargs.get("fast_linear"), kwargs.get("compile_energy"),
                     any(p.requires_grad for p in prior.parameters())))
        return real_run(self, energy, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LangevinSampler, "run", spy)
        a = plain.sample_prior(prior, 300, generator=torch.Generator().manual_seed(5))
        b = fast.sample_prior(prior, 300, generator=torch.Generator().manual_seed(5))
    assert seen == [(False, False, False), (True, True, False)]
    assert all(p.requires_grad for p in prior.parameters())
    assert torch.equal(a.info["is_accepted"], b.info["is_accepted"])
    torch.testing.assert_close(b.samples, a.samples, rtol=1e-4, atol=1e-4)


def test_compile_energy_compiles_the_whole_mala_step_and_follows_the_eager_chains():
    energy = _mlp_energy()
    compiled = CompiledEnergy(energy)
    fast = _mala().run(compiled, _start(), 15, generator=torch.Generator().manual_seed(2))
    eager = _mala().run(energy, _start(), 15, generator=torch.Generator().manual_seed(2))
    (transition,) = compiled._transitions.values()  # the MALA step, compiled around the energy
    assert transition.failure is None and transition._compiled is not None
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.info["acceptance_rate"], eager.info["acceptance_rate"],
                               rtol=1e-4, atol=1e-4)


def test_a_step_that_does_not_compile_runs_eagerly_with_one_warning(monkeypatch):
    real_compile = torch.compile
    compiled_functions = []

    def energy_only(fn, *args, **kwargs):  # compiles the energy, refuses the sampler's step
        compiled_functions.append(fn)
        if len(compiled_functions) > 1:
            raise RuntimeError("cannot trace the step")
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", energy_only)
    energy = _mlp_energy()
    compiled = CompiledEnergy(energy)
    with pytest.warns(RuntimeWarning, match=r"compile_energy: torch.compile could not compile "
                      r"the sampler's step .*cannot trace the step\); its step runs eagerly"
                      ) as record:
        fast = _mala().run(compiled, _start(), 12, generator=torch.Generator().manual_seed(2))
    assert len([w for w in record if "compile_energy" in str(w.message)]) == 1
    assert compiled.failure is None  # the energy itself stays compiled
    eager = _mala().run(energy, _start(), 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1


@pytest.mark.parametrize("env", [None, "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"])
def test_retain_freed_memory_sets_glibc_thresholds_once_unless_the_user_did(monkeypatch, env):
    import ctypes
    import platform

    from ncpvae.mcmc import fastpath

    libc = _FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(fastpath, "_heap_retained", None)
    for name in fastpath._MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv(env, "131072")
    assert fastpath.retain_freed_memory() is (env is None)
    assert fastpath.retain_freed_memory() is (env is None)  # decided once per process
    # M_TRIM_THRESHOLD (-1) 256 MB and M_MMAP_THRESHOLD (-3) 32 MB, once; nothing when set
    assert libc.calls == ([] if env else [(-1, 256 << 20), (-3, 32 << 20)])
    monkeypatch.setattr(fastpath, "_heap_retained", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS, Windows
    assert fastpath.retain_freed_memory() is False
