"""Energies compiled with ``torch.compile``: :class:`CompiledEnergy` (``compile_energy=True``)
and the sampler transitions compiled around its gradient; :func:`prepare_energy` is what
``Sampler.run`` wraps an energy in for its ``fast_linear`` / ``compile_energy`` flags."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ncpvae.errors import ConfigError
from ncpvae.mcmc.fastpath.linear import FastLinearEnergy, register_onednn_op
from ncpvae.mcmc.kernels import Energy, energy_and_grad, row_blocks, rows_indexed

__all__ = ["CompiledEnergy", "prepare_energy"]


class CompiledEnergy:
    """An energy whose value and gradient come from one ``torch.compile``-d function (opt-in:
    ``Sampler.run(..., compile_energy=True)``).

    ``value_and_grad(z)`` is ``torch.func.grad_and_value`` of ``U(z).sum()`` (per-chain values
    as auxiliary output) compiled by TorchInductor, which fuses the elementwise work of the
    forward and backward passes into a few generated kernels; :func:`ncpvae.mcmc.kernels.
    energy_and_grad` uses it for any energy that has such a method. Calling the object is
    calling the wrapped energy (samplers that need only values stay eager).

    ``compile_transition(fn)`` goes one step further: a sampler's whole transition, written as
    a pure tensor function ``fn(value_and_grad, *args)`` (its random draws made beforehand and
    passed in), compiled with this energy's gradient traced inside it, so the sampler's own
    arithmetic (proposal, acceptance, row selection) joins the energy's kernels in one graph
    and one call per step. The ``langevin`` sampler's MALA step uses it.

    The first call for each chain count compiles (seconds to a minute on a CPU, a C++ compiler
    is needed there), so it pays off on long runs; the numbers are float32 as before, with
    other rounding (fused kernels), so chains are not bit-identical to the eager path. Where
    compilation fails (an operation TorchDynamo cannot trace, no compiler), one warning names
    the reason and the energy (or transition) runs eagerly from then on: results never depend
    on it.

    ``fast_linear = True`` (what ``Sampler.run(..., compile_energy=True, fast_linear=True)``
    wraps) traces the energy as a :class:`~ncpvae.mcmc.fastpath.FastLinearEnergy`, its eligible
    linear layers routed to the shape-aware kernels (the mode is entered inside the traced
    function, so it costs nothing at run time and reaches no other code): the compiled function
    then calls oneDNN for the wide matrix products (forward and the input gradient, through the
    ``ncpvae::onednn_mm`` operator, registered at the first such compilation) and Inductor's
    fused kernels for the elementwise work in between, the fastest CPU path in
    ``benchmarks/bench_blackjax.py``.

    On the CPU, more than ``block_rows`` chains are evaluated in near-equal row blocks of at most
    that many (energies are batch-separable, so this changes nothing but speed): the fused
    kernels' intermediates, ``(block, hidden)``, then stay in cache. 4,096 chains of the
    benchmark MLP ran ~12-15 % faster in blocks of 512-1,024 than in one call. Blocks of two
    sizes at most (e.g. 1,020 and 1,021 rows), so at most two compilations per chain count.
    ``block_rows=None`` evaluates all chains at once, as does an energy marked
    ``rows_indexed`` (:func:`ncpvae.mcmc.kernels.rows_indexed`: one data point per chain).

    ``compile_seconds`` is the wall time of the first call of each compiled function
    (compilation plus one evaluation), summed; ``fallback_reason`` why this energy, or a
    transition compiled around it, runs eagerly (None while nothing failed). ``Sampler.run``
    records both in ``diagnostics["fast_path"]``.

    Nothing here changes the process. The allocator tuning that compiled steps profit from
    (last measured at 1,024 chains of the benchmark MLP: the compiled MALA step 5-9 % faster
    than the eager step around the same compiled energy with it, 3-13 % slower without) is the
    user's explicit, process-wide :func:`~ncpvae.mcmc.fastpath.retain_freed_memory`.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor], fast_linear: bool = False,
                 block_rows: int | None = 1024):
        if block_rows is not None and (isinstance(block_rows, bool)
                                       or not isinstance(block_rows, int) or block_rows < 1):
            raise ConfigError(f"block_rows must be a positive integer or None, got "
                              f"{block_rows!r}")
        self.energy = energy
        self.fast_linear = fast_linear
        # what is evaluated, eagerly and traced: the energy, or the energy on the fast kernels
        self._evaluate: Callable[[Tensor], Tensor] = (FastLinearEnergy(energy) if fast_linear
                                                      else energy)
        self.block_rows = block_rows
        self.failure: str | None = None
        self.compile_seconds = 0.0
        self._compiled: Callable[[Tensor], Any] | None = None
        self._transitions: dict[Callable[..., Any], _CompiledTransition] = {}

    def __call__(self, z: Tensor) -> Tensor:
        return self._evaluate(z)

    def _summed(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = self._evaluate(z)
        return u.sum(), u

    def _blocks(self, z: Tensor) -> tuple[Tensor, ...]:
        return row_blocks(z, None if rows_indexed(self.energy) else self.block_rows)

    def _blockwise(self, grad_and_value: Callable[[Tensor], Any], z: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """``(U, ∇U)`` from ``grad_and_value`` (``torch.func.grad_and_value`` of
        :meth:`_summed`, compiled or traced) applied to each row block of ``z``."""
        outs = [grad_and_value(block) for block in self._blocks(z)]
        if len(outs) == 1:
            grad, (_, u) = outs[0]
            return u, grad
        return torch.cat([o[1][1] for o in outs]), torch.cat([o[0] for o in outs])

    def _traced_value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(U, ∇U)`` as plain traceable code, for a transition compiled around it."""
        return self._blockwise(torch.func.grad_and_value(self._summed, has_aux=True), z)

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``U(z)`` ``(C,)`` and ``∇U(z)`` ``(C, D)``, detached."""
        return self._value_and_grad(z)

    @property
    def fallback_reason(self) -> str | None:
        """Why this energy, or the first transition compiled around it that failed, runs
        eagerly; None while every compilation succeeded."""
        if self.failure is not None:
            return self.failure
        return next((t.failure for t in self._transitions.values() if t.failure), None)

    def _value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.failure is None:
            try:
                first = self._compiled is None
                start = time.perf_counter()
                if first:
                    self._prepare_compilation()
                    self._compiled = torch.compile(
                        torch.func.grad_and_value(self._summed, has_aux=True), dynamic=False)
                u, grad = self._blockwise(self._compiled, z.detach())
                if first:
                    self.compile_seconds += time.perf_counter() - start
                return u.detach(), grad.detach()
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                self.failure = _failure_reason(exc)
                _warn_fallback(f"could not compile this energy ({self.failure}); sampling "
                               f"continues without it")
        return energy_and_grad(self._evaluate, z)

    def _prepare_compilation(self) -> None:
        """What a first compilation needs: the opaque oneDNN operator, for a fast-linear
        energy (registered once per process, only then)."""
        if self.fast_linear:
            register_onednn_op()

    def compile_transition(self, transition: Callable[..., Any]) -> Callable[..., Any]:
        """``transition(value_and_grad, *args) -> tensors`` compiled with this energy's
        gradient inside, as a callable of ``*args`` (compiled on first call, once per argument
        shapes; cached per ``transition``). ``value_and_grad(z) -> (U (C,), ∇U (C, D))``.
        ``transition`` must be pure: tensors and Python constants in, tensors out, no random
        draws (pass them in) and no host synchronisation."""
        compiled = self._transitions.get(transition)
        if compiled is None:
            compiled = self._transitions[transition] = _CompiledTransition(self, transition)
        return compiled


class _CompiledTransition:
    """A sampler transition compiled around a :class:`CompiledEnergy`'s traced gradient; runs
    it eagerly (on the energy's own ``value_and_grad``) where compilation fails."""

    def __init__(self, energy: CompiledEnergy, transition: Callable[..., Any]):
        self.energy = energy
        self.transition = transition
        self.failure: str | None = None
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        energy = self.energy
        if self.failure is None and energy.failure is None:
            try:
                first = self._compiled is None
                start = time.perf_counter()
                if first:
                    energy._prepare_compilation()
                    traced, transition = energy._traced_value_and_grad, self.transition

                    def step(*inputs: Any) -> Any:
                        return transition(traced, *inputs)

                    self._compiled = torch.compile(step, dynamic=False)
                out = self._compiled(*args)
                if first:
                    energy.compile_seconds += time.perf_counter() - start
                return out
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                self.failure = _failure_reason(exc)
                _warn_fallback(f"could not compile the sampler's step with this energy "
                               f"({self.failure}); its step runs eagerly")
        return self.transition(partial(energy_and_grad, energy), *args)


def _failure_reason(exc: Exception) -> str:
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {reason}"


def _warn_fallback(message: str) -> None:
    warnings.warn(f"compile_energy: torch.compile {message}", RuntimeWarning, stacklevel=4)


def prepare_energy(energy: Energy, *, fast_linear: bool = False, compile_energy: bool = False
                   ) -> Energy:
    """The energy a sampler evaluates for the ``fast_linear`` / ``compile_energy`` flags of
    ``Sampler.run``: ``energy`` itself when both are False; a :class:`CompiledEnergy` (with
    ``fast_linear``) for ``compile_energy``; a
    :class:`~ncpvae.mcmc.fastpath.FastLinearEnergy` for ``fast_linear`` alone. A
    ``CompiledEnergy`` passed in is used as it is (its compilations reused), unless
    ``fast_linear`` asks for the fast kernels it was not built with: then a new one is made
    around the same energy. Each wrapper routes only that energy's evaluations."""
    if isinstance(energy, CompiledEnergy):
        if fast_linear and not energy.fast_linear:
            return CompiledEnergy(energy.energy, fast_linear=True, block_rows=energy.block_rows)
        return energy
    if compile_energy:
        return CompiledEnergy(energy, fast_linear=fast_linear)
    return FastLinearEnergy(energy) if fast_linear else energy
