"""The ``langevin`` sampler: unadjusted Langevin (ULA) and, with ``metropolis = true``, MALA.

Convention (docs/samplers.md §2), step size ``eps``::

    z' = z - eps ∇U(z) + sqrt(2 eps) xi,        xi ~ N(0, I)

(the ``eps/2``-gradient, ``sqrt(eps)``-noise form is the same algorithm at half the step size).
MALA proposes ``z'`` this way and accepts with probability
``min(1, exp(-U(z')) q(z | z') / (exp(-U(z)) q(z' | z)))``, ``q(z' | z) = N(z'; z - eps ∇U(z),
2 eps I)``; a proposal with a non-finite energy, gradient or position is rejected. MALA is exact
for every ``eps``; ULA is biased (on N(mu, s^2) its stationary variance is
``s^2 / (1 - eps / (2 s^2))``).

Every step costs one energy-and-gradient evaluation (at the proposal); the state caches the
energy and gradient at the current position. ULA with ``adapt_step_size`` computes the MALA
acceptance probability of its moves (``info.acceptance_rate``) and tunes eps by it, a measure of
its discretization error; plain ULA skips that cost and reports 1 for every finite move.

Step-size adaptation (``adapt_step_size``) runs during burn-in only and is frozen afterwards:
a Robbins–Monro update ``log eps += (alpha - target_accept) / t^0.6`` (change clipped to ±1
per step), where ``alpha`` is the mean acceptance probability over chains (one step size for the
run; this couples the chains during burn-in) or, with ``adapt_per_chain``, each chain's own
(one step size per chain; chains stay independent). ULA adapts on the same MALA acceptance
probability.

Divergence (ULA): a chain whose energy, gradient or position becomes non-finite raises
:class:`~ncpvae.errors.NonFiniteError` naming the step and the step size (``on_nonfinite =
"raise"``), or is put back to its previous position and counted (``"reset"``). Under MALA such
proposals are ordinary rejections (counted in ``info.nonfinite``).

A step size of 0 is a no-op: every state stays where it is.

The MALA step is the pure function :func:`mala_transition` (its random draws made first, from
the run's generator, and passed in); compiled (``fast_path = "compiled"``, or ``"auto"``, the
default, on runs of at least :data:`ncpvae.mcmc.fastpath.auto.COMPILE_BREAK_EVEN` chain-steps)
it is compiled whole around the energy's gradient, so the sampler's arithmetic costs no
separate kernel launches per step; ULA compiles the energy's value and gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import BuildContext, ConfigError, MarkovChainConfig, Sampler, hookimpl
from ncpvae.mcmc import (
    Energy,
    LangevinConstants,
    adapt_log_step,
    apply_divergence_policy,
    check_generator,
    energy_and_grad,
    finite_rows,
    initial_energy_and_grad,
    langevin_constants,
    langevin_log_accept,
    langevin_move,
)


class LangevinState(NamedTuple):
    """Chains at ``position`` ``(C, D)``, with cached ``energy`` ``(C,)`` and ``grad`` ``(C, D)``
    there, and each chain's current ``step_size`` ``(C,)`` (equal across chains unless adapted
    per chain)."""

    position: Tensor
    energy: Tensor
    grad: Tensor
    step_size: Tensor


class LangevinInfo(NamedTuple):
    """Per-chain ``(C,)`` facts about one step.

    ``acceptance_rate``: the MALA acceptance probability of the proposal (plain ULA: 1 per finite move).
    ``is_accepted``: whether the chain moved to the proposal (ULA: True unless reset).
    ``energy``: the energy after the step. ``step_size``: the step size used.
    ``nonfinite``: the proposal had a non-finite energy, gradient or position.
    """

    acceptance_rate: Tensor
    is_accepted: Tensor
    energy: Tensor
    step_size: Tensor
    nonfinite: Tensor


def _ula_divergence(bad: Tensor, eps: Tensor) -> str:
    worst = float(eps[bad].max())
    return (f"ULA diverged: energy or position became non-finite in {int(bad.sum())} of "
            f"{bad.shape[0]} chains with step_size={worst:g}; use a smaller step_size "
            f"(e.g. {worst / 10:g}), metropolis=true, or on_nonfinite='reset'")


def mala_transition(value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor]], z: Tensor,
                    u: Tensor, g: Tensor, noise: Tensor, uniform: Tensor,
                    constants: LangevinConstants, correct_proposal: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One MALA step of every chain as a pure tensor function (random draws passed in), so
    that ``compile_energy`` can compile it whole (:meth:`ncpvae.mcmc.fastpath.CompiledEnergy.
    compile_transition`).

    Chains at ``z`` ``(C, D)`` with energy ``u`` ``(C,)`` and gradient ``g`` ``(C, D)``
    propose ``z - eps g + sqrt(2 eps) noise`` (``noise`` ``(C, D)`` standard normal), evaluate
    ``value_and_grad`` there, and accept where ``log(uniform) < log alpha`` (``uniform``
    ``(C,)`` on [0, 1)). Returns the new position, energy and gradient, the acceptance
    probability, the accept decisions and the non-finite-proposal mask (``(C,)`` each).
    ``correct_proposal = False`` is the deliberately wrong sampler of the tests.
    """
    proposal = langevin_move(z, g, constants.step_size, noise, constants=constants)
    new_u, new_g = value_and_grad(proposal)
    log_alpha = langevin_log_accept(z, u, proposal, new_u, new_g, noise, constants.step_size,
                                    correct_proposal=correct_proposal, constants=constants)
    # log_alpha involves U(z'), z' and ∇U(z') (through the backward residual), so it is finite
    # iff they are (barring overflow, a divergence anyway): a cheaper test than finite_rows,
    # and `s - s == 0` is cheaper than isfinite
    ok = ((log_alpha - log_alpha) == 0 if correct_proposal
          else finite_rows(proposal, new_u, new_g))
    nonfinite = ~ok
    # A non-finite proposal is a rejection (NaN ratios would compare False anyway).
    log_alpha = log_alpha.masked_fill(nonfinite, -math.inf)
    alpha = torch.exp(torch.clamp(log_alpha, max=0.0))
    accept = torch.log(uniform) < log_alpha  # never for a non-finite proposal (-inf)
    column = accept.unsqueeze(-1)
    return (torch.where(column, proposal, z), torch.where(accept, new_u, u),
            torch.where(column, new_g, g), alpha, accept, nonfinite)


class LangevinSampler(Sampler):
    """ULA (``metropolis = false``) or MALA (``metropolis = true``); see the module docstring."""

    name = "langevin"
    auto_compile = True  # fast_path="auto" compiles long runs (the MALA step whole)
    _correct_proposal: ClassVar[bool] = True  # tests flip this to get a deliberately wrong MALA

    class Config(MarkovChainConfig):
        name: Literal["langevin"] = "langevin"
        step_size: float = Field(0.05, ge=0, description="eps in z' = z - eps ∇U + sqrt(2 eps) xi; "
                                 "0 is a no-op")
        metropolis: bool = Field(False, description="MALA: add the exact Metropolis-Hastings "
                                 "correction")
        adapt_step_size: bool = Field(False, description="tune step_size during burn-in toward "
                                      "target_accept, then freeze it")
        target_accept: float = Field(0.574, gt=0, lt=1, description="acceptance probability "
                                     "aimed at by adaptation (0.574 is optimal for MALA)")
        adapt_per_chain: bool = Field(False, description="one adapted step size per chain "
                                      "instead of one per run")

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> LangevinSampler:
        return cls(config)

    @property
    def label(self) -> str:
        return "MALA" if self.config.metropolis else "ULA"

    @property
    def shardable_chains(self) -> bool:
        # chains are independent unless one step size is adapted on all chains' acceptance
        return not (self.config.adapt_step_size and not self.config.adapt_per_chain)

    @property
    def acceptance_note(self) -> str | None:
        if self.config.metropolis:
            return None
        if self.config.adapt_step_size:
            return "the would-be MH acceptance (ULA moves are never rejected)"
        return "1 for every finite move (ULA has no Metropolis step)"

    def check_run(self, num_steps: int, burn_in: int, thin: int) -> None:
        if self.config.adapt_step_size and num_steps > 0 and burn_in == 0:
            raise ConfigError("adapt_step_size needs burn_in > 0 (adaptation happens during "
                              "burn-in only)")

    def init(self, position: Tensor, energy: Energy, **options: Any) -> LangevinState:
        u, g = initial_energy_and_grad(energy, position)
        eps = torch.full(position.shape[:1], self.config.step_size, dtype=position.dtype,
                         device=position.device)
        return LangevinState(position.detach(), u, g, eps)

    def step(self, state: LangevinState, energy: Energy, *,
             generator: torch.Generator | None = None, **options: Any
             ) -> tuple[LangevinState, LangevinInfo]:
        z, u, g, eps = state
        check_generator(generator, z)
        xi = self._randn(z, generator)
        consts = self._constants(eps)
        if self.config.metropolis:
            uniform = self._rand(u, generator)
            compile_transition = getattr(energy, "compile_transition", None)
            if compile_transition is not None:  # compile_energy: the whole step in one graph
                transition = compile_transition(mala_transition)
            else:
                transition = partial(mala_transition, partial(energy_and_grad, energy))
            z, u, g, alpha, accept, nonfinite = transition(
                z, u, g, xi, uniform, consts, self._correct_proposal)
            new_state = LangevinState(z, u, g, eps)
            return new_state, LangevinInfo(alpha, accept, u, eps, nonfinite)
        proposal = langevin_move(z, g, eps, xi, constants=consts)
        new_u, new_g = energy_and_grad(energy, proposal)
        ok = finite_rows(proposal, new_u, new_g)
        nonfinite = ~ok
        if self.config.adapt_step_size:  # adaptive ULA tunes eps by the MH acceptance
            log_alpha = langevin_log_accept(z, u, proposal, new_u, new_g, xi, eps,
                                            correct_proposal=self._correct_proposal,
                                            constants=consts)
            alpha = torch.exp(torch.clamp(log_alpha.masked_fill(nonfinite, -math.inf),
                                          max=0.0))
        else:  # plain ULA skips its cost
            alpha = ok.to(u.dtype)  # every finite ULA move is taken
        # the shared divergence policy (raise, or reset non-finite chains)
        new_state = LangevinState(*apply_divergence_policy(
            ok, (proposal, new_u, new_g), (z, u, g), on_nonfinite=self.config.on_nonfinite,
            message=lambda bad: _ula_divergence(bad, eps)), eps)
        return new_state, LangevinInfo(alpha, ok, new_state.energy, eps, nonfinite)

    def _constants(self, eps: Tensor) -> LangevinConstants:
        """The step size's derived constants, recomputed only when the step-size tensor changes
        (after an adaptation step), so a frozen step size costs nothing per step."""
        cached = self.__dict__.get("_cached_constants")
        if cached is None or cached.step_size is not eps:
            # eps starts at config.step_size everywhere and adaptation multiplies it by positive
            # factors, so its sign is known without looking (no device synchronisation)
            known = True if self.config.step_size > 0 else None
            cached = langevin_constants(eps, all_positive=known)
            self.__dict__["_cached_constants"] = cached
        return cached

    def adapt(self, state: LangevinState, info: LangevinInfo, *, iteration: int,
              num_adapt: int) -> LangevinState:
        if not self.config.adapt_step_size:
            return state
        eps = adapt_log_step(state.step_size, info.acceptance_rate, self.config.target_accept,
                             iteration, self.config.adapt_per_chain)
        return state._replace(step_size=eps)


@hookimpl
def ncpvae_register_samplers() -> list[type]:
    return [LangevinSampler]
