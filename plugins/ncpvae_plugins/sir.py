"""The ``sir`` sampler: sampling-importance-resampling from a proposal.

:meth:`SIRSampler.sample_prior` (the usual way to sample an NCP prior, docs/math.md §2): draw
``M = num_candidates * num_samples`` candidates from the proposal (the target prior's
``base_prior`` unless ``proposal=`` is given), weight them by
``w ∝ exp(-U(z) - log q(z))`` with ``U = prior.energy`` and ``q`` the proposal, and resample
``num_samples`` of them with replacement (:func:`ncpvae.sampling_importance_resampling`). For an
NCP prior on its base, ``log w = f(z)`` up to a constant. The draws are exact as ``M -> ∞``;
``diagnostics["ess_fraction"]`` (Kish ESS over M) says how well the proposal covers the target.

:meth:`Sampler.run` on a bare energy needs the proposal as a run option::

    sampler.run(energy, init_position, num_steps, proposal=gaussian_prior)

where ``proposal`` is Prior-like: ``sample(n, *, generator=None) -> (n, D)`` and
``log_prob(z) -> (...)``. There each step is an *iterated SIR* (i-SIR) move, an exact MCMC
kernel: chain c draws ``num_candidates`` fresh candidates, pools them with its current state,
and moves to one of the ``num_candidates + 1`` with probability ∝ weight (Gumbel-max). A step
from a proposal draw is plain SIR with ``num_candidates + 1`` candidates per chain. The energy is
evaluated on ``(C, D)`` batches, one candidate per chain at a time, so per-chain energies such
as a latent posterior work too. Non-finite candidate weights count as zero weight.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from ncpvae import (
    BuildContext,
    ComponentConfig,
    ConfigError,
    DataError,
    NonFiniteError,
    Sampler,
    SampleResult,
    ShardGroup,
    hookimpl,
)
from ncpvae.mcmc import (
    Energy,
    check_generator,
    check_positions,
    ess_fraction,
    evaluate_energy,
    sampling_importance_resampling,
)


class SIRState(NamedTuple):
    """``position`` ``(C, D)``, its ``energy`` ``(C,)`` and importance ``log_weight``
    ``-U(z) - log q(z)`` ``(C,)`` under the proposal q."""

    position: Tensor
    energy: Tensor
    log_weight: Tensor


class SIRInfo(NamedTuple):
    """Per-chain ``(C,)``: ``energy`` after the step; ``is_accepted`` (moved to a fresh
    candidate); ``ess_fraction`` of the step's ``num_candidates + 1`` weights; ``nonfinite``
    (some candidate had a non-finite weight)."""

    energy: Tensor
    is_accepted: Tensor
    ess_fraction: Tensor
    nonfinite: Tensor


def _log_weights(energy: Tensor, log_q: Tensor) -> Tensor:
    lw = -energy - log_q
    return torch.where(torch.isnan(lw) | torch.isposinf(lw), torch.full_like(lw, -math.inf), lw)


class SIRSampler(Sampler):
    """Sampling-importance-resampling; see the module docstring."""

    name = "sir"
    run_options = frozenset({"proposal"})

    class Config(ComponentConfig):
        name: Literal["sir"] = "sir"
        num_candidates: int = Field(100, ge=1, description="proposal draws per returned sample "
                                    "(sample_prior), or fresh candidates per chain and step (run)")
        chunk_size: int = Field(65536, ge=1, description="candidates per energy evaluation in "
                                "sample_prior (bounds memory)")

    @property
    def label(self) -> str:
        return "SIR"

    @classmethod
    def from_config(cls, config: Config, ctx: BuildContext) -> SIRSampler:
        return cls(config)

    # -- plain SIR for priors ------------------------------------------------------------------

    def sample_prior(self, prior, num_samples: int, *, generator: torch.Generator | None = None,
                     progress: bool = False, shards: ShardGroup | None = None,
                     proposal=None) -> SampleResult:
        """``num_samples`` SIR draws from ``prior`` (``samples`` is ``(1, num_samples, D)``).

        ``proposal`` defaults to ``prior.base_prior``. ``shards`` is not used: the resampling
        is global, so every rank of a split run draws all samples (the one-process draws).
        Diagnostics: ``ess_fraction`` and ``ess`` of the M candidate weights,
        ``num_candidates`` (M), ``log_mean_weight`` (an estimate of ``log E_q[exp(-U) / q]``,
        i.e. ``log Z`` when ``exp(-U)`` is the unnormalized target and q is normalized),
        ``wall_time_s``, ``samples_per_s``.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        proposal = prior.base_prior if proposal is None else proposal
        start = time.perf_counter()
        total = self.config.num_candidates * num_samples

        def log_weight(part: Tensor) -> Tensor:
            return _log_weights(prior.energy(part), proposal.log_prob(part))

        draws, log_w = sampling_importance_resampling(
            lambda m: proposal.sample(m, generator=generator), log_weight, num_samples,
            self.config.num_candidates, chunk_size=self.config.chunk_size, generator=generator,
            progress=progress)
        ess_frac = ess_fraction(log_w)
        with torch.no_grad():
            draw_energy = prior.energy(draws)
        wall = time.perf_counter() - start
        lw64 = log_w.to(torch.float64)
        diagnostics = {
            "sampler": self.name,
            "num_chains": num_samples,
            "num_draws": 1,
            "num_candidates": total,
            "ess_fraction": ess_frac,
            "ess": ess_frac * total,
            "log_mean_weight": float(torch.logsumexp(lw64, 0) - math.log(total)),
            "num_nonfinite": int((~torch.isfinite(lw64)).sum()),
            "wall_time_s": wall,
            "samples_per_s": num_samples / wall if wall > 0 else float("nan"),
        }
        info = {"energy": draw_energy.detach().unsqueeze(0)}
        return SampleResult(draws.unsqueeze(0), info, diagnostics)

    # -- i-SIR kernel for run() ----------------------------------------------------------------

    @staticmethod
    def _require_proposal(proposal: Any) -> Any:
        if proposal is None or not (hasattr(proposal, "sample") and hasattr(proposal, "log_prob")):
            raise ConfigError(
                "the sir sampler needs proposal=<object with sample(n, generator=) and "
                "log_prob(z)>, e.g. run(energy, z0, steps, proposal=prior.base_prior)"
            )
        return proposal

    def init(self, position: Tensor, energy: Energy, *, proposal: Any = None,
             **options: Any) -> SIRState:
        check_positions(position)
        proposal = self._require_proposal(proposal)
        u = evaluate_energy(energy, position)
        with torch.no_grad():
            lw = _log_weights(u, proposal.log_prob(position))
        if not torch.isfinite(lw).all():
            raise NonFiniteError(
                f"the importance weight is zero or non-finite at the initial position of "
                f"{int((~torch.isfinite(lw)).sum())} of {position.shape[0]} chains; start them "
                f"at proposal draws"
            )
        return SIRState(position.detach(), u, lw.detach())

    def step(self, state: SIRState, energy: Energy, *, generator: torch.Generator | None = None,
             proposal: Any = None, **options: Any) -> tuple[SIRState, SIRInfo]:
        proposal = self._require_proposal(proposal)
        z = state.position
        check_generator(generator, z)
        c, d = z.shape
        k = self.config.num_candidates
        fresh = proposal.sample(k * c, generator=generator).detach()
        if fresh.shape != (k * c, d):
            raise DataError(f"proposal.sample({k * c}) returned shape {tuple(fresh.shape)}, "
                            f"expected ({k * c}, {d})")
        fresh = fresh.to(dtype=z.dtype, device=z.device).reshape(k, c, d)
        energies = [state.energy]
        log_w = [state.log_weight]
        with torch.no_grad():
            for j in range(k):  # one candidate per chain at a time: (C, D) batches
                u_j = evaluate_energy(energy, fresh[j])
                energies.append(u_j)
                log_w.append(_log_weights(u_j, proposal.log_prob(fresh[j])))
        all_u = torch.stack(energies)  # (K + 1, C)
        all_lw = torch.stack(log_w)
        gumbel = -torch.log(-torch.log(self._rand(all_lw, generator, dim=1)))  # chains: dim 1
        choice = torch.argmax(all_lw + gumbel, dim=0)  # (C,)
        positions = torch.cat([z.unsqueeze(0), fresh])  # (K + 1, C, D)
        rows = torch.arange(c, device=z.device)
        new_state = SIRState(positions[choice, rows], all_u[choice, rows], all_lw[choice, rows])
        lw64 = all_lw.to(torch.float64)
        ess = torch.exp(2 * torch.logsumexp(lw64, 0) - torch.logsumexp(2 * lw64, 0)) / (k + 1)
        info = SIRInfo(new_state.energy, choice != 0, ess.to(z.dtype),
                       (~torch.isfinite(all_lw)).any(0))
        return new_state, info


@hookimpl
def ncpvae_register_samplers() -> list[type]:
    return [SIRSampler]
