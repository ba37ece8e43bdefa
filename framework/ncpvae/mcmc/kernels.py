"""Kernel building blocks shared by every Markov-chain sampler (built-in or third-party).

Convention (docs/samplers.md §1): the target is ``pi(z) ∝ exp(-U(z))``; an :data:`Energy` maps chains
``(C, D)`` to ``(C,)`` and must be batch-separable (row i depends on ``z[i]`` only), because
every gradient is ``autograd.grad(U(z).sum(), z)``.

- input checks: :func:`check_positions`, :func:`check_generator`;
- energies: :func:`evaluate_energy`, :func:`energy_and_grad` (row blocks on a CPU,
  :func:`row_blocks`), :func:`initial_energy_and_grad`;
- row bookkeeping: :func:`finite_rows`, :func:`select_rows`;
- the one Langevin move (:func:`langevin_move`), its Metropolis–Hastings ratio
  (:func:`langevin_log_accept`) and the Robbins–Monro step-size update (:func:`adapt_log_step`),
  used by the ``langevin`` (ULA/MALA) and ``sgld`` samplers;
- the one divergence policy of unadjusted moves (:func:`apply_divergence_policy`), checked
  at once or, inside :func:`deferred_divergence`, at an interval without host synchronisation.

Everything here is exported from the ``ncpvae`` top level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ncpvae.errors import ConfigError, DataError, NonFiniteError

#: An energy: chains ``(C, D)`` -> per-chain values ``(C,)`` (batch-separable).
Energy = Callable[[Tensor], Tensor]

#: What an unadjusted move does when a chain's energy, gradient or position becomes non-finite.
OnNonfinite = Literal["raise", "reset"]


# ----------------------------------------------------------------------------------------------
# input checks


def check_positions(position: Tensor, what: str = "initial positions") -> None:
    """Raise :class:`DataError` unless ``position`` is a finite floating ``(C, D)`` tensor."""
    if not isinstance(position, Tensor):
        raise DataError(f"{what}: expected a torch.Tensor (C, D), got {type(position).__name__}")
    if position.ndim != 2 or position.shape[0] < 1 or position.shape[1] < 1:
        raise DataError(f"{what}: expected shape (C, D) with C, D >= 1, got {tuple(position.shape)}")
    if not position.is_floating_point():
        raise DataError(f"{what}: expected a floating dtype, got {position.dtype}")
    if not torch.isfinite(position).all():
        raise DataError(f"{what}: contain NaN or infinite values")


def check_generator(generator: torch.Generator | None, like: Tensor) -> None:
    """Raise :class:`ConfigError` if ``generator`` lives on another device than ``like``."""
    if generator is not None and generator.device.type != like.device.type:
        raise ConfigError(
            f"the generator is on {generator.device} but the chains are on {like.device}; "
            f"create it with torch.Generator(device='{like.device.type}')"
        )


# ----------------------------------------------------------------------------------------------
# energies and gradients


def evaluate_energy(energy: Energy, position: Tensor) -> Tensor:
    """``U(position)`` ``(C,)`` without a graph, checked to be ``(C,)``."""
    with torch.no_grad():
        u = energy(position)
    _check_energy_shape(u, position)
    return u.detach()


#: on a CPU, :func:`energy_and_grad` splits more than ``CPU_BLOCK_FROM`` chains into row
#: blocks of at most ``CPU_BLOCK_ROWS`` (see there)
CPU_BLOCK_FROM = 2048
CPU_BLOCK_ROWS = 1024


def rows_indexed(energy: Any) -> bool:
    """Whether row i of ``energy``'s output also depends on the index i (``energy.rows_indexed
    = True``: one data point per chain, as :func:`ncpvae.mcmc.targets.posterior_energy`), so
    its chains must be evaluated all at once, never in row blocks."""
    return bool(getattr(energy, "rows_indexed", False))


def row_blocks(position: Tensor, block_rows: int | None) -> tuple[Tensor, ...]:
    """``position`` ``(C, D)`` as ``ceil(C / block_rows)`` row blocks whose sizes differ by at
    most one row (views, in order), on a CPU only; one block on other devices, with
    ``block_rows=None`` or when ``C <= block_rows``. Two block sizes at most, so a compiled
    function sees at most two shapes per chain count."""
    rows = position.shape[0]
    if block_rows is None or position.device.type != "cpu" or rows <= block_rows:
        return (position,)
    count = -(-rows // block_rows)
    base, extra = divmod(rows, count)
    return position.split([base + 1] * extra + [base] * (count - extra))


def energy_and_grad(energy: Energy, position: Tensor) -> tuple[Tensor, Tensor]:
    """``U(z)`` ``(C,)`` and ``∇U(z)`` ``(C, D)`` from one backward pass, both detached.

    The gradient is ``autograd.grad(U(z).sum(), z)``, correct for batch-separable energies.
    Parameters inside ``energy`` (e.g. a classifier's weights) get no ``.grad``. An energy
    object with a ``value_and_grad(z) -> (U, ∇U)`` method (an analytic gradient, or
    :class:`ncpvae.mcmc.fastpath.CompiledEnergy`) supplies both itself.

    On a CPU, more than :data:`CPU_BLOCK_FROM` chains are evaluated in near-equal row blocks
    of at most :data:`CPU_BLOCK_ROWS` (:func:`row_blocks`): batch-separability makes this the
    same function, and the blocks' activations, ``(block, hidden)``, stay in the core's cache
    between the forward and the backward pass. On the benchmark MLP (10-256-256-1 SiLU, one
    thread, docs/speed.md §1) blocks of 1,024 rows evaluated 4,096 chains ~18 % and 16,384
    chains ~60 % faster than one call. The values may differ from one call's in the last bit
    (a matrix library may sum a row in another order for another row count: NCP's energy at
    1,500 chains in two blocks did, its gradient did not); up to ``CPU_BLOCK_FROM`` chains,
    which covers every sampler run of the shipped configs, the evaluation is one call as
    before, bit for bit. An energy marked :func:`rows_indexed` is always one call.
    """
    fused = getattr(energy, "value_and_grad", None)
    if fused is not None:
        u, grad = fused(position)
        _check_energy_shape(u, position)
        if not isinstance(grad, Tensor) or grad.shape != position.shape:
            raise DataError(f"value_and_grad must return the gradient with the positions' shape "
                            f"{tuple(position.shape)}, got "
                            f"{tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__}")
        return u, grad
    split = position.shape[0] > CPU_BLOCK_FROM and not rows_indexed(energy)
    blocks = row_blocks(position, CPU_BLOCK_ROWS if split else None)
    if len(blocks) == 1:
        return _autograd_energy_and_grad(energy, position, position)
    outs = [_autograd_energy_and_grad(energy, block, position) for block in blocks]
    return torch.cat([u for u, _ in outs]), torch.cat([g for _, g in outs])


def _autograd_energy_and_grad(energy: Energy, block: Tensor, position: Tensor
                              ) -> tuple[Tensor, Tensor]:
    """:func:`energy_and_grad` by autograd on ``block``, rows of ``position`` (named in the
    shape error, so it speaks of the chains the caller passed)."""
    with torch.enable_grad():
        z = block.detach().requires_grad_(True)
        u = energy(z)
        _check_energy_shape(u, block, chains=position.shape[0])
        if u.requires_grad:
            (grad,) = torch.autograd.grad(u.sum(), z, allow_unused=True)
        else:
            grad = None
    if grad is None:  # the energy does not depend on z
        grad = torch.zeros_like(block)
    return u.detach(), grad  # autograd.grad without create_graph returns graph-free tensors


def _check_energy_shape(u: Any, position: Tensor, chains: int | None = None) -> None:
    """Raise unless ``u`` is ``(rows of position,)``; the message names ``chains`` (default:
    those rows), the count the caller passed when ``position`` is one of its row blocks."""
    if not isinstance(u, Tensor) or u.shape != position.shape[:1]:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise DataError(
            f"the energy must map chains (C, D) to per-chain values (C,) = "
            f"({position.shape[0] if chains is None else chains},), got {shape}; do not reduce "
            f"over chains (no .sum()/.mean())"
        )


def initial_energy_and_grad(energy: Energy, position: Tensor) -> tuple[Tensor, Tensor]:
    """``U`` ``(C,)`` and ``∇U`` ``(C, D)`` at chains' starting points; non-finite is an error
    (a chain cannot recover from a start where the energy or its gradient is undefined)."""
    check_positions(position)
    u, g = energy_and_grad(energy, position)
    bad = ~finite_rows(position, u, g)
    if bad.any():
        raise NonFiniteError(
            f"the energy or its gradient is non-finite at the initial position of "
            f"{int(bad.sum())} of {position.shape[0]} chains; start them elsewhere"
        )
    return u, g


# ----------------------------------------------------------------------------------------------
# rows


def finite_rows(position: Tensor, energy: Tensor, grad: Tensor | None = None) -> Tensor:
    """``(C,)`` bool: chains whose position, energy (and gradient) are all finite.

    Tested through one per-chain sum of everything (several times cheaper than
    ``isfinite(...).all(-1)``), and ``s - s == 0`` (NaN for an infinite or NaN ``s``; cheaper
    than ``isfinite``): a sum is non-finite when an entry is, or when finite entries overflow it
    (values near the dtype's max), and such a chain has diverged anyway.
    """
    total = position.sum(-1) + energy
    if grad is not None:
        total = total + grad.sum(-1)
    return (total - total) == 0


def select_rows(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Row-wise ``where``: rows of ``new`` where ``mask`` ``(C,)`` is True, else rows of ``old``."""
    return torch.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


# ----------------------------------------------------------------------------------------------
# the Langevin move


class LangevinConstants(NamedTuple):
    """Per-chain quantities of a Langevin step size that stay fixed while it does (compute them
    once with :func:`langevin_constants`, reuse them every step): ``step_size`` eps ``(C,)``,
    ``step_column`` eps ``(C, 1)``, ``noise_column`` ``sqrt(2 eps)`` ``(C, 1)``, ``four_step``
    ``4 eps`` (4 where eps = 0) ``(C,)``, and ``positive``: the ``(C,)`` mask ``eps > 0``, or
    None when every chain's eps is positive."""

    step_size: Tensor
    step_column: Tensor
    noise_column: Tensor
    four_step: Tensor
    positive: Tensor | None


def langevin_constants(step_size: Tensor, *, all_positive: bool | None = None
                       ) -> LangevinConstants:
    """:class:`LangevinConstants` of a ``(C,)`` step size; call it when the step size changes,
    not every step. ``all_positive`` tells whether every entry is known to be > 0 (a sampler
    knows it from its config: adaptation multiplies eps by positive factors); None tests it,
    which synchronises with the device once."""
    positive = step_size > 0
    safe = torch.where(positive, step_size, torch.ones_like(step_size))
    if all_positive is None:
        all_positive = bool(positive.all())
    column = step_size.unsqueeze(-1)
    return LangevinConstants(step_size, column, torch.sqrt(2 * column), 4 * safe,
                             None if all_positive else positive)


def langevin_move(position: Tensor, grad: Tensor, step_size: Tensor | float, noise: Tensor,
                  noise_scale: Tensor | float | None = None, *,
                  constants: LangevinConstants | None = None) -> Tensor:
    """The Langevin proposal ``z' = z - eps ∇U(z) + s xi`` of every chain, ``(C, D)``.

    ``position``, ``grad`` (``∇U`` at ``position``) and ``noise`` ``xi ~ N(0, I)`` are
    ``(C, D)``. ``noise_scale`` s defaults to ``sqrt(2 eps)`` (the target ``exp(-U)``); SGLD
    passes ``sqrt(2 eps T)`` for temperature T. ``step_size`` eps (and s) is either a ``(C,)``
    tensor (one per chain; the update then runs as two fused multiply-adds) or a Python float
    shared by all chains (plain scalar arithmetic). The two forms agree up to rounding.
    ``constants`` (:func:`langevin_constants` of the tensor ``step_size``, default noise)
    saves recomputing eps's column and ``sqrt(2 eps)``; same result.
    """
    if constants is not None:
        return torch.addcmul(torch.addcmul(position, constants.step_column, grad, value=-1.0),
                             constants.noise_column, noise)
    if isinstance(step_size, Tensor):
        scale = step_size.unsqueeze(-1)
        if noise_scale is None:
            spread = torch.sqrt(2 * scale)
        elif isinstance(noise_scale, Tensor):
            spread = noise_scale.unsqueeze(-1)
        else:
            spread = torch.full_like(scale, noise_scale)
        return torch.addcmul(torch.addcmul(position, scale, grad, value=-1.0), spread, noise)
    spread = math.sqrt(2 * step_size) if noise_scale is None else noise_scale
    return position - step_size * grad + spread * noise


def langevin_log_accept(position: Tensor, energy: Tensor, proposal: Tensor,
                        proposal_energy: Tensor, proposal_grad: Tensor, noise: Tensor,
                        step_size: Tensor, *, correct_proposal: bool = True,
                        constants: LangevinConstants | None = None) -> Tensor:
    """``(C,)`` log MH ratio ``U(z) - U(z') + log q(z | z') - log q(z' | z)`` of the move
    ``z' = z - eps ∇U(z) + sqrt(2 eps) xi`` (:func:`langevin_move` with the default noise).

    ``log q(z' | z) = -|xi|^2 / 2`` (up to the shared constant) and, with the backward residual
    ``r = z - z' + eps ∇U(z')``, ``log q(z | z') = -|r|^2 / (4 eps)``. Chains with
    ``step_size == 0`` get 0 (their proposal is their position). ``correct_proposal = False``
    drops the ``q`` terms (a wrong sampler, kept for tests that must reject it). Shapes:
    positions, gradient and noise ``(C, D)``; energies and step size ``(C,)``. ``constants``
    (:func:`langevin_constants` of ``step_size``) saves recomputing them; same result.
    """
    if constants is None:
        constants = langevin_constants(step_size)
    log_ratio = energy - proposal_energy
    if correct_proposal:
        residual = torch.addcmul(position - proposal, constants.step_column, proposal_grad)
        log_q_forward = -0.5 * (noise * noise).sum(-1)
        log_q_backward = -(residual * residual).sum(-1) / constants.four_step
        log_ratio = log_ratio + log_q_backward - log_q_forward
    if constants.positive is None:
        return log_ratio
    return torch.where(constants.positive, log_ratio, torch.zeros_like(log_ratio))


def adapt_log_step(step_size: Tensor, acceptance: Tensor, target: float, iteration: int,
                   per_chain: bool) -> Tensor:
    """One Robbins–Monro step on ``log step_size`` ``(C,)`` toward mean acceptance ``target``:
    ``log eps += clip((alpha - target) / t^0.6, -1, 1)``, with ``alpha`` each chain's acceptance
    ``(C,)`` (``per_chain``) or their mean (one step size for all chains)."""
    accept = acceptance if per_chain else acceptance.mean().expand_as(acceptance)
    delta = ((accept - target) / iteration**0.6).clamp(-1.0, 1.0)
    return step_size * torch.exp(delta)


# ----------------------------------------------------------------------------------------------
# the divergence policy of unadjusted moves


class DivergenceLog:
    """Deferred divergence checks: what :func:`apply_divergence_policy` records, inside
    :func:`deferred_divergence`, instead of synchronising with the device every step.

    ``step`` is the current step number (the caller, e.g. :meth:`ncpvae.Sampler.run`, sets it
    before each step); :meth:`first_divergence` looks at everything recorded since the last
    call in one synchronisation and returns the first bad step with its message.
    """

    def __init__(self) -> None:
        self.step = 0
        self._records: list[tuple[int, Tensor, Callable[[Tensor], str]]] = []

    def record(self, ok: Tensor, message: Callable[[Tensor], str]) -> None:
        self._records.append((self.step, ok, message))

    def first_divergence(self) -> tuple[int, str] | None:
        """``(step, message)`` of the earliest recorded step with a non-finite chain, or None;
        forgets the records either way."""
        records, self._records = self._records, []
        if not records:
            return None
        any_bad = (~torch.stack([ok for _, ok, _ in records])).any(-1).tolist()
        for (step, ok, message), bad in zip(records, any_bad):
            if bad:
                return step, message(~ok)
        return None


_DIVERGENCE_LOG: ContextVar[DivergenceLog | None] = ContextVar("ncpvae_divergence_log",
                                                               default=None)


@contextmanager
def deferred_divergence() -> Iterator[DivergenceLog]:
    """Within this context, :func:`apply_divergence_policy` never synchronises with the device:
    it keeps non-finite chains at their previous rows and records the ``raise`` cases in the
    yielded :class:`DivergenceLog`, for the caller to check at an interval of its choosing."""
    log = DivergenceLog()
    token = _DIVERGENCE_LOG.set(log)
    try:
        yield log
    finally:
        _DIVERGENCE_LOG.reset(token)


def apply_divergence_policy(ok: Tensor, new: Sequence[Tensor], old: Sequence[Tensor], *,
                            on_nonfinite: OnNonfinite, message: Callable[[Tensor], str]
                            ) -> tuple[Tensor, ...]:
    """The state fields after an unadjusted move whose finite chains are ``ok`` ``(C,)``.

    ``new`` and ``old`` are matching state fields (each with chains first, e.g. position
    ``(C, D)``, energy ``(C,)``, gradient ``(C, D)``). If every chain is finite, ``new`` is
    returned as is. Otherwise ``on_nonfinite = "raise"`` raises :class:`NonFiniteError` with
    ``message(bad)`` (``bad`` = ``~ok``; the message should name the step size and a remedy;
    :meth:`ncpvae.Sampler.run` adds the step number), and ``"reset"`` keeps the non-finite
    chains at their ``old`` rows (the caller counts them through ``~ok``). Inside
    :func:`deferred_divergence` the rows are always selected and a ``"raise"`` is recorded for
    a later check instead (no host synchronisation); the returned values are the same.
    """
    log = _DIVERGENCE_LOG.get()
    if log is not None:  # deferred (see deferred_divergence): no host synchronisation
        if on_nonfinite == "raise":
            log.record(ok, message)
        return tuple(select_rows(ok, n, o) for n, o in zip(new, old))
    if bool(ok.all()):
        return tuple(new)
    if on_nonfinite == "raise":
        raise NonFiniteError(message(~ok))
    return tuple(select_rows(ok, n, o) for n, o in zip(new, old))
