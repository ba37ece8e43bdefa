"""``compile_energy`` / :class:`CompiledEnergy`, ``fast_linear`` and the ``value_and_grad``
energy protocol: the compiled value and gradient agree with autograd to float32 rounding, MALA
chains follow the eager ones, a failed compilation falls back to the eager numbers with one
warning, any energy object with its own ``value_and_grad`` is used as given (and checked), and
the fast paths have no process-wide side effect: importing ncpvae changes nothing in torch or
the allocator, a fast-linear energy reroutes its own linear layers only, and the allocator is
tuned only when the user calls ``retain_freed_memory``."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from ncpvae_plugins.langevin import LangevinSampler

from ncpvae.errors import ConfigError, DataError
from ncpvae.mcmc.fastpath import CompiledEnergy, linear, memory
from ncpvae.mcmc.kernels import energy_and_grad

onednn = pytest.mark.skipif(not linear.onednn_available(), reason="torch without oneDNN")


@pytest.fixture(autouse=True)
def allocator_untouched(monkeypatch):
    """Every test here: nothing but an explicit ``retain_freed_memory()`` reaches glibc's
    ``mallopt`` (``ctypes.CDLL(None)``, the process's own C library), compilations included."""
    opened = []
    real_cdll = ctypes.CDLL

    def spy(name, *args, **kwargs):
        opened.append(name)
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", spy)
    monkeypatch.setattr(memory, "_heap_retained", None)
    yield
    assert None not in opened and memory._heap_retained is None


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
@onednn
def test_compiled_energy_with_fast_linear_matches_autograd_and_eager_chains(recwarn):
    # a wide layer with enough rows (one block) for the oneDNN operator inside the compiled
    # graph, a narrow input and a single output for the two transposed/broadcast gradient rules
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32),
                              torch.nn.SiLU(), torch.nn.Linear(32, 1)).requires_grad_(False)

    def energy(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)

    z = torch.randn(linear._MIN_ONEDNN_ROWS, 4, generator=torch.Generator().manual_seed(1))
    compiled = CompiledEnergy(energy, fast_linear=True, block_rows=None)
    u, g = compiled.value_and_grad(z)
    u_ref, g_ref = energy_and_grad(energy, z)
    # the opaque operator exists once a fast-linear energy has compiled (registered then)
    assert compiled.failure is None and hasattr(torch.ops.ncpvae, "onednn_mm")
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
    prior = NCPPrior(GaussianPrior(3), classifier=MLPClassifier(3, hidden=(32, 32)), fitted=True)
    config = {"step_size": 0.2, "metropolis": True, "num_steps": 12, "burn_in": 2, "thin": 5}
    plain = LangevinSampler(LangevinSampler.Config(**config))
    fast = LangevinSampler(LangevinSampler.Config(**config, fast_linear=True,
                                                  compile_energy=True))
    assert plain.fast_paths() == {"fast_linear": False, "compile_energy": False,
                                  "fast_path": "auto"}
    assert fast.fast_paths() == {"fast_linear": True, "compile_energy": True,
                                 "fast_path": "auto"}
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
    import platform

    from ncpvae.mcmc.fastpath import retain_freed_memory

    libc = _FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for name in memory._MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv(env, "131072")
    assert retain_freed_memory() is (env is None)
    assert retain_freed_memory() is (env is None)  # decided once per process
    # M_TRIM_THRESHOLD (-1) 256 MB and M_MMAP_THRESHOLD (-3) 32 MB, once; nothing when set
    assert libc.calls == ([] if env else [(-1, 256 << 20), (-3, 32 << 20)])
    monkeypatch.setattr(memory, "_heap_retained", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS, Windows
    assert retain_freed_memory() is False
    monkeypatch.setattr(memory, "_heap_retained", None)  # for the fixture: the process's own


_IMPORT_CHECK = """
import ctypes, sys
import torch
import torch.nn.functional as F
opened = []
real_cdll = ctypes.CDLL
ctypes.CDLL = lambda name, *a, **k: opened.append(name) or real_cdll(name, *a, **k)
torch_before, f_before = dict(vars(torch)), dict(vars(F))
import ncpvae, ncpvae.mcmc.fastpath, ncpvae_plugins.langevin
changed = sorted(k for k, v in f_before.items() if vars(F).get(k) is not v)
changed += sorted(k for k, v in torch_before.items()
                  if callable(v) and vars(torch).get(k) is not v)
assert not changed, changed
assert not hasattr(torch.ops.ncpvae, "onednn_mm"), "operator registered at import"
assert None not in opened, "the C library opened at import (mallopt)"
from ncpvae.mcmc.fastpath import memory, register_onednn_op
assert memory._heap_retained is None
if register_onednn_op():  # where oneDNN exists: registered on demand, twice harmlessly
    assert register_onednn_op() and hasattr(torch.ops.ncpvae, "onednn_mm")
print("ok")
"""


def test_import_changes_nothing_in_torch_or_the_allocator():
    # a fresh interpreter: `import ncpvae` (and the fast-path module, and a plugin) leaves every
    # function of torch and torch.nn.functional as it was, registers no torch.library operator
    # and never opens the C library for mallopt
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@onednn
def test_registering_the_operator_again_is_harmless(monkeypatch):
    assert linear.register_onednn_op() and linear.register_onednn_op()
    monkeypatch.setattr(linear, "_op_ready", False)  # as for a second copy of the module
    assert linear.register_onednn_op() and hasattr(torch.ops.ncpvae, "onednn_mm")


@onednn
def test_fast_linear_reroutes_only_the_energy_that_asked_for_it(monkeypatch):
    # While a fast-linear MALA run evaluates its energy, another frozen model (wide, many rows:
    # eligible for oneDNN) runs in another thread, and the same model runs in this thread
    # between steps (a callback): both go through torch's own F.linear, bit for bit, and only
    # the energy's own layers are routed; the chains follow the default ones.
    routed = []  # (thread, weight) of every linear call the fast path took over
    real = linear._fast_f_linear

    def spy(cache, x, weight, bias=None):
        routed.append((threading.get_ident(), weight))
        return real(cache, x, weight, bias)

    monkeypatch.setattr(linear, "_fast_f_linear", spy)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(),
                              torch.nn.Linear(32, 1)).requires_grad_(False)
    other = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(linear._MIN_ONEDNN_ROWS, 64, generator=torch.Generator().manual_seed(7))
    expected = F.linear(x, other.weight, other.bias)
    in_thread, between_steps = [], []

    def energy(z: torch.Tensor) -> torch.Tensor:
        u = 0.5 * (z * z).sum(-1) - net(z).squeeze(-1)
        worker = threading.Thread(target=lambda: in_thread.append(other(x)))
        worker.start()
        worker.join()
        return u

    def callback(step, state, info):
        between_steps.append((F.linear is expected_linear, other(x)))

    expected_linear = F.linear
    start = torch.randn(256, 3, generator=torch.Generator().manual_seed(3))
    fast = _mala().run(energy, start, 5, generator=torch.Generator().manual_seed(2),
                       fast_linear=True, callback=callback)
    main = threading.get_ident()
    assert routed and all(t == main for t, _ in routed)
    assert {id(w) for _, w in routed} == {id(net[0].weight), id(net[2].weight)}
    assert len(in_thread) == 6 and all(torch.equal(out, expected) for out in in_thread)
    assert len(between_steps) == 5
    assert all(same and torch.equal(out, expected) for same, out in between_steps)
    routed.clear()
    eager = _mala().run(energy, start, 5, generator=torch.Generator().manual_seed(2))
    assert not routed  # the default run routes nothing
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)
