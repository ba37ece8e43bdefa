"""The ``fast_path`` setting of ``Sampler.run``: ``"eager"``, ``"compiled"`` or ``"auto"``.

``"auto"`` (the default) compiles the energy (:class:`~ncpvae.mcmc.fastpath.CompiledEnergy`;
for the ``langevin`` sampler's MALA step the whole transition) only when the run is long enough
to repay the compilation: ``chains x steps >= COMPILE_BREAK_EVEN``, and only for samplers that
opt in (``Sampler.auto_compile``). Below it the run is eager, bit for bit the run of before.

The break-even (docs/speed.md), measured with ``benchmarks/bench_defaults.py``'s energy (the
benchmark MLP of ``benchmarks/bench_blackjax.py``, D = 10, 10-256-256-1 SiLU) on this 2-core x86
CPU, 1 thread, under load from other jobs: the first call of the compiled MALA step took 40 s
with a cold TorchInductor cache (2-7 s warm), and a compiled chain-step saved 0.8-3.5 us
(eager 4.5-7.9 us, compiled 3.9-4.6 us per chain-step at 1,024-4,096 chains). A cold
compilation therefore pays back after 40 s / 2.5 us ~ 1.6e7 chain-steps (1.1e7-5e7 over the
measured savings), a warm one after 6e5-8e5. The threshold is 2^24 = 16,777,216 chain-steps
(e.g. 4,096 chains x 4,096 steps): compiling above it pays off even from a cold cache, and
every sampler run of the shipped configs (at most 2,000 chains x 300 steps = 6e5) stays eager,
so their numbers are unchanged.

The choice is a pure function of the request, the sampler and the run's size (no timing, no
global state), so a seeded run is reproducible per mode; which mode ran, and the compilation's
time and fallback reason, are in the result's ``diagnostics["fast_path"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ncpvae.errors import ConfigError

__all__ = ["COMPILE_BREAK_EVEN", "FAST_PATHS", "FastPath", "FastPathChoice", "choose_fast_path"]

#: what ``fast_path`` may be
FastPath = Literal["auto", "eager", "compiled"]
FAST_PATHS: tuple[str, ...] = ("auto", "eager", "compiled")

#: chains x steps from which ``fast_path = "auto"`` compiles (see the module docstring)
COMPILE_BREAK_EVEN = 1 << 24


@dataclasses.dataclass(frozen=True)
class FastPathChoice:
    """The mode a run uses: ``requested`` (``auto``/``eager``/``compiled``), the resolved
    ``mode`` (``eager`` or ``compiled``), the run's ``chain_steps`` (chains x steps), the
    ``threshold`` the auto rule compared with, and a one-line ``reason``."""

    requested: str
    mode: Literal["eager", "compiled"]
    chain_steps: int
    threshold: int
    reason: str

    @property
    def compiles(self) -> bool:
        return self.mode == "compiled"

    def record(self, energy: Any = None) -> dict[str, Any]:
        """The JSON-ready record of this choice for ``diagnostics["fast_path"]``; with the
        energy the run evaluated, also the compilation's first-call seconds (compilation plus
        one evaluation, summed over the compiled functions; 0 when nothing compiled) and the
        reason it fell back to eager (None when it did not)."""
        out: dict[str, Any] = dataclasses.asdict(self)
        if self.compiles and energy is not None:
            out["compile_seconds"] = float(getattr(energy, "compile_seconds", 0.0))
            out["fallback"] = getattr(energy, "fallback_reason", None)
        return out


def choose_fast_path(requested: str, chains: int, steps: int, *, auto_compile: bool,
                     threshold: int | None = None) -> FastPathChoice:
    """The mode of a run of ``chains`` x ``steps``: ``requested`` itself unless it is
    ``"auto"``, which compiles when the sampler opts in (``auto_compile``) and ``chains *
    steps >= threshold`` (default :data:`COMPILE_BREAK_EVEN`). Raises :class:`ConfigError` on
    an unknown ``requested``."""
    if threshold is None:
        threshold = COMPILE_BREAK_EVEN
    if requested not in FAST_PATHS:
        raise ConfigError(f"fast_path must be one of {', '.join(FAST_PATHS)}, got "
                          f"{requested!r}")
    work = int(chains) * int(steps)
    if requested != "auto":
        return FastPathChoice(requested, requested, work, threshold,  # type: ignore[arg-type]
                              f"fast_path={requested!r} requested")
    if not auto_compile:
        return FastPathChoice("auto", "eager", work, threshold,
                              "this sampler does not compile its step automatically")
    if work >= threshold:
        return FastPathChoice("auto", "compiled", work, threshold,
                              f"chains x steps = {work:,} >= {threshold:,}: compiling repays "
                              f"its cost")
    return FastPathChoice("auto", "eager", work, threshold,
                          f"chains x steps = {work:,} < {threshold:,}: too short to repay a "
                          f"compilation")
