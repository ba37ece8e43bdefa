"""``fast_path = "auto"`` (the samplers' default): the decision at both sides of the break-even
(the mode is asserted, never a timing), the record in ``diagnostics["fast_path"]``, eager runs
bit-identical to ``fast_path = "eager"``, compiled chains that follow the eager ones to float32
rounding (the same accept decisions, positions within 1e-4), and a bad value refused."""

from __future__ import annotations

import pytest
import torch
from ncpvae_plugins.langevin import LangevinSampler
from test_compiled_energy import _mlp_energy as _energy  # 3-32-1 SiLU MLP energy

from ncpvae.errors import ConfigError
from ncpvae.mcmc.fastpath import auto
from ncpvae.mcmc.fastpath.auto import COMPILE_BREAK_EVEN, choose_fast_path


def _start(chains: int = 64) -> torch.Tensor:
    return torch.randn(chains, 3, generator=torch.Generator().manual_seed(1))


def _mala(**fields) -> LangevinSampler:
    return LangevinSampler(step_size=0.1, metropolis=True, **fields)


@pytest.mark.parametrize("chains,steps,mode", [
    (COMPILE_BREAK_EVEN // 1000, 999, "eager"),      # just below
    (COMPILE_BREAK_EVEN // 1024, 1024, "compiled"),  # exactly at the break-even
    (1, COMPILE_BREAK_EVEN + 1, "compiled"),         # one chain, very long
    (COMPILE_BREAK_EVEN - 1, 1, "eager"),
])
def test_auto_compiles_from_the_break_even_on(chains, steps, mode):
    choice = choose_fast_path("auto", chains, steps, auto_compile=True)
    assert choice.mode == mode and choice.chain_steps == chains * steps
    assert choice.threshold == COMPILE_BREAK_EVEN


def test_auto_stays_eager_for_samplers_that_do_not_opt_in_and_explicit_modes_win():
    big = COMPILE_BREAK_EVEN
    assert choose_fast_path("auto", big, 2, auto_compile=False).mode == "eager"
    assert choose_fast_path("eager", big, 2, auto_compile=True).mode == "eager"
    assert choose_fast_path("compiled", 1, 1, auto_compile=False).mode == "compiled"
    with pytest.raises(ConfigError, match="fast_path must be one of auto, eager, compiled"):
        choose_fast_path("fast", 1, 1, auto_compile=True)


def test_langevin_opts_in_and_the_config_default_is_auto():
    assert LangevinSampler.auto_compile
    assert _mala().config.fast_path == "auto"
    with pytest.raises(ConfigError, match="fast_path"):
        LangevinSampler(step_size=0.1, fast_path="fastest")


def test_a_short_default_run_is_the_eager_run_bit_for_bit():
    energy = _energy()
    default = _mala().run(energy, _start(), 20, generator=torch.Generator().manual_seed(2))
    eager = _mala().run(energy, _start(), 20, generator=torch.Generator().manual_seed(2),
                        fast_path="eager")
    record = default.diagnostics["fast_path"]
    assert record["requested"] == "auto" and record["mode"] == "eager"
    assert record["chain_steps"] == 64 * 20 and "compile_seconds" not in record
    assert torch.equal(default.samples, eager.samples)
    assert torch.equal(default.info["is_accepted"], eager.info["is_accepted"])


@pytest.mark.slow  # torch.compile
def test_a_run_above_the_break_even_compiles_and_follows_the_eager_chains(monkeypatch, recwarn):
    monkeypatch.setattr(auto, "COMPILE_BREAK_EVEN", 64 * 15)  # a small break-even for the test
    energy = _energy()
    fast = _mala().run(energy, _start(), 15, generator=torch.Generator().manual_seed(2))
    eager = _mala().run(energy, _start(), 15, generator=torch.Generator().manual_seed(2),
                        fast_path="eager")
    record = fast.diagnostics["fast_path"]
    assert record["mode"] == "compiled" and record["fallback"] is None
    assert record["compile_seconds"] > 0
    assert not [w for w in recwarn if "compile_energy" in str(w.message)]
    assert eager.diagnostics["fast_path"]["mode"] == "eager"
    # float32 rounding of fused kernels only: the same accept decisions, positions within 1e-4
    assert torch.equal(fast.info["is_accepted"], eager.info["is_accepted"])
    torch.testing.assert_close(fast.samples, eager.samples, rtol=1e-4, atol=1e-4)
    # seeded runs are reproducible per mode
    again = _mala().run(energy, _start(), 15, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.samples, fast.samples)


@pytest.mark.slow  # torch.compile
def test_a_failed_compilation_is_recorded_with_one_warning(monkeypatch):
    monkeypatch.setattr(auto, "COMPILE_BREAK_EVEN", 1)

    def refuse(fn, *args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", refuse)
    energy = _energy()
    with pytest.warns(RuntimeWarning, match="compile_energy: torch.compile") as record:
        fast = _mala().run(energy, _start(), 5, generator=torch.Generator().manual_seed(2))
    assert len([w for w in record if "compile_energy" in str(w.message)]) == 1
    assert "no C++ compiler" in fast.diagnostics["fast_path"]["fallback"]
    eager = _mala().run(energy, _start(), 5, generator=torch.Generator().manual_seed(2),
                        fast_path="eager")
    assert torch.equal(fast.samples, eager.samples)
