"""Fast paths for energies, each scoped to the energy that asks for it.

- ``fast_path = "auto"`` (``Sampler.run``'s default): the rule that picks eager or compiled
  evaluation from the run's size, :func:`ncpvae.mcmc.fastpath.auto.choose_fast_path` (compiled
  from :data:`~ncpvae.mcmc.fastpath.auto.COMPILE_BREAK_EVEN` chain-steps on, for samplers that
  opt in; docs/speed.md).

- :class:`FastLinearEnergy` (``Sampler.run(..., fast_linear=True)``): the energy's frozen
  float32 CPU linear layers on shape-aware kernels (oneDNN for wide products, transposed or
  broadcast products for narrow gradients), through a torch-function mode that is active only
  while that energy is evaluated, in the evaluating thread (:mod:`ncpvae.mcmc.fastpath.linear`);
  :func:`onednn_linear` is the same mode as a context for a block of the caller's own code.
- :class:`CompiledEnergy` (``compile_energy=True``): the energy's value and gradient, and a
  sampler's whole transition around them, compiled with ``torch.compile``; combines with
  ``fast_linear`` (:mod:`ncpvae.mcmc.fastpath.compiled`).
- :func:`retain_freed_memory`: glibc allocator tuning that makes compiled steps faster; an
  explicit, process-wide call for applications, never made by ncpvae
  (:mod:`ncpvae.mcmc.fastpath.memory`).

Importing this package changes nothing in the process: ``torch`` is never assigned to, the
``ncpvae::onednn_mm`` operator is registered the first time a fast-linear energy is compiled,
and the allocator is left alone unless the user calls :func:`retain_freed_memory`.
"""

from ncpvae.mcmc.fastpath.compiled import CompiledEnergy, prepare_energy
from ncpvae.mcmc.fastpath.linear import (
    FastLinearEnergy,
    onednn_available,
    onednn_linear,
    register_onednn_op,
)
from ncpvae.mcmc.fastpath.memory import retain_freed_memory

__all__ = [
    "CompiledEnergy",
    "FastLinearEnergy",
    "onednn_available",
    "onednn_linear",
    "prepare_energy",
    "register_onednn_op",
    "retain_freed_memory",
]
