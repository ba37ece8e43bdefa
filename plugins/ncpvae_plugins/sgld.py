"""The ``sgld`` sampler: stochastic-gradient Langevin dynamics (Welling & Teh, 2011).

The ULA move of docs/samplers.md §2 with a decreasing step size and an optional temperature::

    eps_t = a (b + t)^(-gamma),   t = 0, 1, 2, ...
    z' = z - eps_t ∇U(z) + sqrt(2 eps_t T) xi,    xi ~ N(0, I)

``gamma`` in (0.5, 1] gives Welling & Teh's convergence conditions; ``gamma = 0`` is the
documented special case of a *constant* step ``eps_t = a`` (then the stationary law is biased as
for ULA: on N(mu, s^2) with gradient noise of variance sg^2 its variance is
``s^2 (1 + eps sg^2 / 2) / (1 - eps / (2 s^2))``, times ``T``). ``T = 1`` targets ``exp(-U)``;
``T = 0`` is noisy-gradient descent. No Metropolis correction.

Minibatch energies. The energy stays a callable ``(C, D) -> (C,)``; a minibatch estimate is a
callable that draws its own minibatch at every call, e.g. :class:`MinibatchEnergy`, which draws
an independent minibatch for every chain (so chains stay independent and batch-separable) and
rescales the likelihood part by ``N / n`` (unbiased for the full-data energy). SGLD calls the
energy exactly once per step (at the new position; the state caches energy and gradient), so each
step sees one fresh minibatch. The per-step energies in ``info`` are then minibatch estimates.

Under ``torchrun`` the chains are split across ranks (``Sampler.run(..., shards=...)``): the
noise ``xi`` comes through the sampler's ``_randn`` and the minibatch indices through
:func:`ncpvae.randint_rows`, both the single-process draws' rows, so a split run gives the
one-process chains.

Divergence handling is ULA's (``on_nonfinite``: raise naming the step and step size, or reset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ncpvae import BuildContext, ConfigError, DataError, MarkovChainConfig, Sampler, hookimpl, randint_rows
from ncpvae.mcmc import (
    Energy,
    apply_divergence_policy,
    check_generator,
    energy_and_grad,
    finite_rows,
    initial_energy_and_grad,
    langevin_move,
)


class SGLDState(NamedTuple):
    """``position`` ``(C, D)``, cached ``energy`` ``(C,)`` and ``grad`` ``(C, D)`` (minibatch
    estimates when the energy is one), and ``step_count`` t (0 before the first step)."""

    position: Tensor
    energy: Tensor
    grad: Tensor
    step_count: int


class SGLDInfo(NamedTuple):
    """Per-chain ``(C,)``: ``energy`` after the step, ``step_size`` eps_t used, ``nonfinite``."""

    energy: Tensor
    step_size: Tensor
    nonfinite: Tensor


class MinibatchEnergy:
    """An unbiased minibatch estimate of ``U(z) = U_0(z) + sum_{i=1}^N u(z, x_i)``.

    ``data_term(z, batch) -> (C, n)``: per-datum energies ``u(z_c, x_{c,j})`` (e.g. negative
    log-likelihoods) for chains ``z`` ``(C, D)`` and their minibatches ``batch`` ``(C, n, ...)``.
    ``prior_energy(z) -> (C,)`` is the data-free part ``U_0`` (optional).

    Each call draws, for every chain, ``batch_size`` indices uniformly with replacement from the
    ``N = len(data)`` rows (using ``generator``), and returns
    ``U_0(z) + (N / n) sum_j u(z, x_{c,j})``, whose expectation is the full-data energy.
    The indices are drawn with :func:`ncpvae.randint_rows` (chains = rows), so when the chains
    are split across ranks (``torchrun``) every chain gets the single-process minibatches.
    """

    def __init__(self, data_term: Callable[[Tensor, Tensor], Tensor], data: Tensor,
                 batch_size: int, *, prior_energy: Energy | None = None,
                 generator: torch.Generator | None = None):
        if data.ndim < 1 or data.shape[0] < 1:
            raise DataError(f"minibatch energy: data must have at least one row, got shape "
                            f"{tuple(data.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"minibatch energy: batch_size must be a positive integer, got "
                              f"{batch_size!r}")
        self.data_term = data_term
        self.data = data
        self.batch_size = batch_size
        self.prior_energy = prior_energy
        self.generator = generator

    @property
    def num_data(self) -> int:
        return int(self.data.shape[0])

    def full(self, z: Tensor) -> Tensor:
        """The exact full-data energy ``(C,)`` (every chain sees all N rows)."""
        batch = self.data.unsqueeze(0).expand(z.shape[0], *self.data.shape)
        u = self.data_term(z, batch).sum(-1)
        return u + self.prior_energy(z) if self.prior_energy is not None else u

    def __call__(self, z: Tensor) -> Tensor:
        # the chains are the rows: under torchrun, a rank running a block of the chains keeps
        # the single-process indices of its chains (the generator advances as in one process)
        index = randint_rows(self.num_data, (z.shape[0], self.batch_size), dim=0,
                             generator=self.generator, device=self.data.device)
        batch = self.data[index]  # (C, n, ...)
        per_datum = self.data_term(z, batch)
        if per_datum.shape != (z.shape[0], self.batch_size):
            raise DataError(
                f"minibatch energy: data_term must return per-datum energies (C, n) = "
                f"({z.shape[0]}, {self.batch_size}), got {tuple(per_datum.shape)}"
            )
        u = per_datum.sum(-1) * (self.num_data / self.batch_size)
        return u + self.prior_energy(z) if self.prior_energy is not None else u


class SGLDSampler(Sampler):
    """SGLD with ``eps_t = a (b + t)^-gamma`` and temperature; see the module docstring."""

    name = "sgld"

    class Config(MarkovChainConfig):
        name: Literal["sgld"] = "sgld"
        a: float = Field(0.01, ge=0, description="step-size scale a in eps_t = a (b + t)^-gamma; "
                         "0 is a no-op")
        b: float = Field(1.0, gt=0, description="step-size offset b")
        gamma: float = Field(0.55, ge=0, le=1, description="step-size decay exponent, in "
                             "(0.5, 1]; 0 means a constant step eps_t = a")
        temperature: float = Field(1.0, ge=0, description="T: noise sqrt(2 eps_t T); 1 targets "
                                   "exp(-U)")

        @model_validator(mode="after")
        def _check(self):
            if 0 < self.gamma <= 0.5:
                raise ValueError(f"gamma must be in (0.5, 1] (or 0 for a constant step), got "
                                 f"{self.gamma}")
            return self

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> SGLDSampler:
        return cls(config)

    @property
    def label(self) -> str:
        return "SGLD"

    @property
    def shardable_chains(self) -> bool:
        return True  # independent chains; noise and minibatch indices are per-chain row draws

    def step_size_at(self, t: int) -> float:
        """``eps_t = a (b + t)^-gamma`` (``a`` when ``gamma = 0``)."""
        cfg = self.config
        return cfg.a * (cfg.b + t) ** (-cfg.gamma)

    def init(self, position: Tensor, energy: Energy, **options: Any) -> SGLDState:
        u, g = initial_energy_and_grad(energy, position)
        return SGLDState(position.detach(), u, g, 0)

    def step(self, state: SGLDState, energy: Energy, *,
             generator: torch.Generator | None = None, **options: Any
             ) -> tuple[SGLDState, SGLDInfo]:
        z, u, g, t = state
        check_generator(generator, z)
        eps = self.step_size_at(t)
        xi = self._randn(z, generator)
        proposal = langevin_move(z, g, eps, xi, (2 * eps * self.config.temperature) ** 0.5)
        new_u, new_g = energy_and_grad(energy, proposal)
        ok = finite_rows(proposal, new_u, new_g)
        position, new_u, new_g = apply_divergence_policy(
            ok, (proposal, new_u, new_g), (z, u, g), on_nonfinite=self.config.on_nonfinite,
            message=lambda bad: (
                f"SGLD diverged: energy or position became non-finite in {int(bad.sum())} of "
                f"{z.shape[0]} chains with step_size={eps:g}; use a smaller step size (a, or a "
                f"larger b; e.g. a={self.config.a / 10:g}) or on_nonfinite='reset'"))
        new_state = SGLDState(position, new_u, new_g, t + 1)
        return new_state, SGLDInfo(new_u, torch.full_like(u, eps), ~ok)


@hookimpl
def ncpvae_register_samplers() -> list[type]:
    return [SGLDSampler]
