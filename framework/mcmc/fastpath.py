"""Opt-in fast paths for energies: oneDNN matrix products for linear layers on the CPU
(:func:`onednn_linear`), and energies compiled with ``torch.compile`` (:class:`CompiledEnergy`).

On some CPUs (issue 11: a 2-core AMD EPYC) torch's default float32 ``mm`` (MKL) runs at about
half the speed of the same product through oneDNN, and an NCP-like energy spends ~70 % of a
sampler step in its linear layers. Inside :func:`onednn_linear`, every call of
``torch.nn.functional.linear`` (which ``nn.Linear`` uses) whose input is a float32 CPU tensor
and whose weight and bias need no gradient runs through oneDNN, forward and backward (the
gradient with respect to the input, which is what a sampler needs). Every other call (other
devices or dtypes, trainable weights) falls back to the original function. So it applies to any
energy a user passes — a learned prior's, a posterior through a decoder — without knowing its
structure.

Precision: both paths are float32 GEMMs with float32 accumulation; they differ only in rounding
order (relative differences ~1e-7 per product, see ``tests/test_samplers_contract.py``), not in
precision. Seeded chains are therefore not bit-identical to the default path, which is why the
fast path is opt-in (``Sampler.run(..., fast_linear=True)`` or this context manager) and off by
default. The routing adds a few small tensor operations per layer call, so it only pays off
when the products are large (about 10^3 chains and more; at 1 chain it is slower); measure with
``benchmarks/bench_blackjax.py`` (column ``run() oneDNN``). The patch is process-wide while the
context is open (do not run other float32 linear layers in other threads meanwhile if you need
their default rounding).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ncpvae.mcmc.kernels import energy_and_grad


def onednn_available() -> bool:
    """Whether this torch build can run the oneDNN linear kernel."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn,
                                                                    "_linear_pointwise")


def _onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a 2-D float32 ``x`` ``(n, in)`` and ``weight`` ``(out, in)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """Linear layer through oneDNN; differentiable in the input only (frozen weights)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,
                weight_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight_t)
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight_t,) = ctx.saved_tensors
        # grad_x = grad @ W = grad @ (W^T)^T: the same kernel with W^T as the "weight"
        return _onednn_mm(grad.contiguous(), weight_t, None), None, None, None


@contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Route eligible ``F.linear`` calls through oneDNN while the context is open (see the
    module docstring); yields whether the fast path is active (False when ``enabled`` is
    False or this torch build lacks oneDNN, in which case nothing changes)."""
    if not enabled or not onednn_available():
        yield False
        return
    original = F.linear
    transposed: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}

    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if (input.device.type != "cpu" or input.dtype != torch.float32
                or weight.dtype != torch.float32 or weight.requires_grad
                or (bias is not None and (bias.requires_grad or bias.dtype != torch.float32))
                or input.ndim < 1 or weight.ndim != 2 or weight.is_sparse):
            return original(input, weight, bias)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        weight_t = transposed.get(key)
        if weight_t is None:
            weight_t = transposed[key] = weight.t().contiguous()
        flat = input.reshape(-1, input.shape[-1]).contiguous()
        if input.requires_grad and torch.is_grad_enabled():
            out = _OneDNNLinear.apply(flat, weight, bias, weight_t)
        else:
            out = _onednn_mm(flat, weight, bias)
        return out.reshape(*input.shape[:-1], weight.shape[0])

    F.linear = linear
    try:
        yield True
    finally:
        F.linear = original


class CompiledEnergy:
    """An energy whose value and gradient come from one ``torch.compile``-d function (opt-in:
    ``Sampler.run(..., compile_energy=True)``).

    ``value_and_grad(z)`` is ``torch.func.grad_and_value`` of ``U(z).sum()`` (per-chain values
    as auxiliary output) compiled by TorchInductor, which fuses the elementwise work of the
    forward and backward passes into a few generated kernels; :func:`ncpvae.mcmc.kernels.
    energy_and_grad` uses it for any energy that has such a method. Calling the object is
    calling the wrapped energy (samplers that need only values stay eager).

    The first call for each chain count compiles (seconds to a minute on a CPU, a C++ compiler
    is needed there), so it pays off on long runs; the numbers are float32 as before, with
    other rounding (fused kernels), so chains are not bit-identical to the eager path. Where
    compilation fails (an operation TorchDynamo cannot trace, no compiler), one warning names
    the reason and the energy runs eagerly from then on: results never depend on it.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor]):
        self.energy = energy
        self.failure: str | None = None
        self._compiled: Callable[[Tensor], Any] | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return self.energy(z)

    def _summed(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = self.energy(z)
        return u.sum(), u

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``U(z)`` ``(C,)`` and ``∇U(z)`` ``(C, D)``, detached."""
        if self.failure is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(
                        torch.func.grad_and_value(self._summed, has_aux=True), dynamic=False)
                grad, (_, u) = self._compiled(z.detach())
                return u.detach(), grad.detach()
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                self.failure = f"{type(exc).__name__}: {reason}"
                warnings.warn(f"compile_energy: torch.compile could not compile this energy "
                              f"({self.failure}); sampling continues without it",
                              RuntimeWarning, stacklevel=2)
        return energy_and_grad(self.energy, z)
