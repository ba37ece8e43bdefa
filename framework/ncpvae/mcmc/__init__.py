"""MCMC building blocks for sampler authors (public namespace): energies and their gradients,
Langevin moves and Metropolis corrections, the divergence policy, importance resampling,
diagnostics (ESS, split R-hat, MCSE) and the energies of common targets.

The compiled fast paths have their own namespace, :mod:`ncpvae.mcmc.fastpath`.
"""

from ncpvae.mcmc.diagnostics import acceptance_summary, ess, mcse_mean, split_rhat, summarize
from ncpvae.mcmc.importance import (
    SIRDraws,
    ess_fraction,
    importance_resample,
    sampling_importance_resampling,
)
from ncpvae.mcmc.kernels import (
    DivergenceLog,
    Energy,
    LangevinConstants,
    OnNonfinite,
    adapt_log_step,
    apply_divergence_policy,
    check_generator,
    check_positions,
    deferred_divergence,
    energy_and_grad,
    evaluate_energy,
    finite_rows,
    initial_energy_and_grad,
    langevin_constants,
    langevin_log_accept,
    langevin_move,
)
from ncpvae.mcmc.targets import posterior_energy

__all__ = [
    # energies and gradients
    "Energy",
    "check_generator",
    "check_positions",
    "energy_and_grad",
    "evaluate_energy",
    "initial_energy_and_grad",
    "posterior_energy",
    # Langevin moves, Metropolis correction, step-size adaptation
    "LangevinConstants",
    "langevin_constants",
    "langevin_log_accept",
    "langevin_move",
    "adapt_log_step",
    # non-finite chains
    "OnNonfinite",
    "DivergenceLog",
    "apply_divergence_policy",
    "deferred_divergence",
    "finite_rows",
    # importance resampling
    "SIRDraws",
    "ess_fraction",
    "importance_resample",
    "sampling_importance_resampling",
    # diagnostics
    "acceptance_summary",
    "ess",
    "mcse_mean",
    "split_rhat",
    "summarize",
]
