"""Shape-aware kernels for an energy's frozen linear layers on the CPU, scoped to that energy.

:class:`FastLinearEnergy` evaluates an energy inside a :class:`torch.overrides.TorchFunctionMode`
(:func:`onednn_linear`) that is active only while the energy runs, in the calling thread only.
Inside it, every ``torch.nn.functional.linear`` call (which ``nn.Linear`` makes) whose input is
a float32 CPU tensor and whose weight and bias need no gradient runs through
:class:`_FastLinear`, which picks a kernel per product by its shape:

- wide layers (both sides >= 16 features) with >= 2,048 rows: oneDNN, forward and backward. On
  some CPUs (issue 11: a 2-core AMD EPYC) torch's default float32 ``mm`` (MKL) runs at about half
  the speed of oneDNN; on this project's current host they are within ~10 %, MKL ahead at 1,024
  rows and oneDNN at 4,096 (``benchmarks/bench_blackjax.py``);
- the input gradient of a narrow layer (fewer than 16 inputs: the first layer of a prior's
  network on a latent space): computed transposed, 3-4x faster than MKL's ``grad @ W``;
- the input gradient of a one-output layer: a broadcast product instead of an outer-product GEMM.

Every other call (other devices or dtypes, trainable weights) runs torch's own ``F.linear``. So
it applies to any energy a user passes — a learned prior's, a posterior through a decoder —
without knowing its structure, and nothing outside the energy's evaluation is rerouted: ``torch``
is never assigned to, other threads and other models in the process run as usual.

Precision: every path is float32 products with float32 accumulation; they differ from the
default only in summation order (relative differences ~1e-7 per product, see
``tests/test_samplers_contract.py``), not in precision. Seeded chains are therefore not
bit-identical to the default path, which is why the fast path is opt-in and off by default.

For compiled energies (:class:`ncpvae.mcmc.fastpath.CompiledEnergy`) the oneDNN product is an
opaque ``torch.library`` operator, ``ncpvae::onednn_mm``, registered the first time such an
energy compiles (:func:`register_onednn_op`), never at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FastLinearEnergy", "onednn_available", "onednn_linear", "register_onednn_op"]


def onednn_available() -> bool:
    """Whether this torch build can run the oneDNN linear kernel."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn,
                                                                    "_linear_pointwise")


def _raw_onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The same kernel as an opaque operator, so that TorchInductor (CompiledEnergy) calls it as it
# is instead of lowering it: its own lowering of the mkldnn op needs prepacked constant weights
# (freezing), which a sampler's energy does not have. Registered through the low-level
# ``torch.library.Library`` (a CPU kernel and a shape function, no autograd kernel: the
# autograd.Function below differentiates it), which costs a few microseconds per call where
# ``torch.library.custom_op``'s wrapper costs ~100.
# (torch < 2.4 has no register_fake: there the compiled path calls the raw op, which Inductor
# refuses, and CompiledEnergy falls back to eager with its one warning.)
_OP_NAMESPACE, _OP_NAME = "ncpvae", "onednn_mm"
_op_library: torch.library.Library | None = None
_op_ready = False  # read by traced code: True once the operator exists in this process
_op_lock = threading.Lock()


def _op_exists() -> bool:
    return hasattr(getattr(torch.ops, _OP_NAMESPACE), _OP_NAME)


def register_onednn_op() -> bool:
    """Register the opaque ``ncpvae::onednn_mm`` operator that compiled fast-linear energies
    call; returns whether it is available. Idempotent and thread-safe: a second call, or an
    operator of that name registered before (another copy of this module), changes nothing.
    :class:`~ncpvae.mcmc.fastpath.CompiledEnergy` calls it before its first compilation with
    ``fast_linear=True``; nothing registers it at import."""
    global _op_library, _op_ready
    if _op_ready:
        return True
    if not hasattr(torch.library, "register_fake") or not onednn_available():
        return False
    with _op_lock:
        if not _op_ready and not _op_exists():
            library = torch.library.Library(_OP_NAMESPACE, "FRAGMENT")
            library.define(f"{_OP_NAME}(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
            library.impl(_OP_NAME, _raw_onednn_mm, "CPU")
            torch.library.register_fake(f"{_OP_NAMESPACE}::{_OP_NAME}", _onednn_mm_shape,
                                        lib=library)
            _op_library = library  # the registration lives as long as this object
        _op_ready = True
    return True


def _onednn_mm_shape(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a 2-D float32 ``x`` ``(n, in)`` and ``weight`` ``(out, in)``."""
    if _op_ready and torch.compiler.is_compiling():
        return getattr(getattr(torch.ops, _OP_NAMESPACE), _OP_NAME)(x, weight, bias)
    return _raw_onednn_mm(x, weight, bias)


# Below this many features a side of a layer is narrow (a latent dimension, a scalar output):
# oneDNN then loses to MKL, and MKL itself is slow on ``grad @ W`` with a narrow result.
_NARROW = 16
# Below this many rows MKL was as fast as oneDNN here (1,024 x 256 x 256: 1.7 vs 1.8 ms) and
# oneDNN costs ~50 us more per call; at 4,096 rows oneDNN was faster (7.8 vs 8.3 ms).
_MIN_ONEDNN_ROWS = 2048
# Below this many rows eager calls keep the plain layer: the routing's Python cost (~30 us per
# layer) exceeds what the narrow-shape rules save. Compiled code has no such cost: it routes all.
_MIN_ROUTED_ROWS = 128


def _wide(rows: int, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` with ``x`` ``(rows, in)`` goes through oneDNN."""
    return rows >= _MIN_ONEDNN_ROWS and min(weight.shape) >= _NARROW


def _linear_kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if _wide(x.shape[0], weight):
        return _onednn_mm(x, weight, bias)
    if torch.compiler.is_compiling() and bias is not None:
        # a separate bias add, which Inductor fuses into the next elementwise kernel (the
        # activation), where addmm would first copy the bias into every row of its output;
        # written as ``- (-bias)`` (the same float32 sum) because Inductor rewrites
        # ``mm + bias`` back into addmm on the CPU
        return torch.mm(x, weight.t()) - bias.neg()
    return F.linear(x, weight, bias)


class _FastLinear(torch.autograd.Function):
    """``x @ W^T + b`` for a 2-D ``x`` ``(N, in)``, differentiable in ``x`` only (frozen
    weights), each product through the kernel that is fastest for its shape:

    - wide layers with many rows: oneDNN, forward and backward (``grad @ W`` is the same kernel
      with ``W^T`` as the weight);
    - one output (``W`` ``(1, in)``): ``grad @ W`` is an outer product, computed as a broadcast
      multiply (the same single products, bit for bit);
    - a narrow input (``in < 16``, e.g. the latent layer of a prior's network): ``grad @ W``
      as ``(W^T grad^T)^T`` (``W^T`` a view); MKL runs ``(N, out) @ (out, in)`` with a narrow
      result 3-4x slower than its transpose (measured: 726 vs 228 us at N = 1024, out = 256,
      in = 10).

    Written with a separate ``setup_context`` so that ``torch.func.grad`` (CompiledEnergy) can
    trace it.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                weight_t: Tensor | None) -> Tensor:  # type: ignore[override]
        return _linear_kernel(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.weight_t = inputs[3]  # contiguous W^T for a wide layer's oneDNN backward, else None
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        n_out, n_in = weight.shape
        if n_out == 1:
            grad_x = grad * weight
        elif n_in < _NARROW:
            grad_x = torch.mm(weight.t(), grad.t()).t().contiguous()
        elif ctx.weight_t is not None:
            grad_x = _onednn_mm(grad.contiguous(), ctx.weight_t, None)
        else:
            grad_x = grad @ weight
        return grad_x, None, None, None


class _TransposeCache:
    """Contiguous ``W^T`` of the wide weights an eager energy's backward needs, computed once
    per weight and version (an in-place update of the weight makes a new one). Holds each
    weight, so an entry can never be mistaken for a later tensor at the same address."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, int, Tensor]] = {}

    def get(self, weight: Tensor) -> Tensor:
        entry = self._entries.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = self._entries[id(weight)] = (weight, weight._version,
                                                 weight.t().contiguous())
        return entry[2]


def _backward_weight(weight: Tensor, rows: int, compiling: bool,
                     cache: _TransposeCache) -> Tensor | None:
    """Contiguous ``W^T`` for a wide layer's oneDNN backward (cached eagerly, transposed in the
    graph when compiling); None for every other layer, which needs none."""
    if not _wide(rows, weight):
        return None
    return weight.t().contiguous() if compiling else cache.get(weight)


def _eligible(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return not (input.device.type != "cpu" or input.dtype != torch.float32
                or weight.dtype != torch.float32 or weight.requires_grad
                or (bias is not None and (bias.requires_grad or bias.dtype != torch.float32))
                or input.ndim < 1 or weight.ndim != 2 or weight.is_sparse)


def _fast_f_linear(cache: _TransposeCache, input: Tensor, weight: Tensor,
                   bias: Tensor | None = None) -> Tensor:
    """``F.linear`` inside :class:`_FastLinearMode`: one module-level function, so that
    compiled code that traced it stays valid across evaluations."""
    compiling = torch.compiler.is_compiling()
    if not _eligible(input, weight, bias) or (
            not compiling and input.numel() < _MIN_ROUTED_ROWS * weight.shape[1]):
        return F.linear(input, weight, bias)
    flat = input.reshape(-1, input.shape[-1]).contiguous()
    if compiling or (input.requires_grad and torch.is_grad_enabled()):
        out = _FastLinear.apply(flat, weight, bias,
                                _backward_weight(weight, flat.shape[0], compiling, cache))
    else:
        out = _linear_kernel(flat, weight, bias)
    return out.reshape(*input.shape[:-1], weight.shape[0])


class _FastLinearMode(TorchFunctionMode):
    """Routes ``F.linear`` calls to :func:`_fast_f_linear`; every other torch call runs as it
    is. A torch-function mode is per thread and active only between its enter and exit."""

    def __init__(self, cache: _TransposeCache):
        super().__init__()
        self.cache = cache

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _fast_f_linear(self.cache, *args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Route eligible ``F.linear`` calls made in this thread through the shape-aware kernels
    while the context is open (see the module docstring); yields whether the fast path is
    active (False when ``enabled`` is False or this torch build lacks oneDNN, in which case
    nothing changes). Other threads, and this thread after the context, are untouched; contexts
    nest. Prefer :class:`FastLinearEnergy`, which opens it around the energy only."""
    if not enabled or not onednn_available():
        yield False
        return
    with _FastLinearMode(_TransposeCache()):
        yield True


class FastLinearEnergy:
    """An energy evaluated with its frozen float32 CPU linear layers on the shape-aware kernels
    (what ``Sampler.run(..., fast_linear=True)`` wraps): ``FastLinearEnergy(energy)(z)`` is
    ``energy(z)`` ``(C,)`` for chains ``z`` ``(C, D)``, evaluated inside :func:`onednn_linear`;
    the backward pass of that evaluation (``autograd.grad``) runs the matching kernels. An
    energy with its own ``value_and_grad`` keeps it, evaluated the same way.

    Eager evaluations of fewer than 128 chains run ``energy`` as it is: the mode's Python cost
    per torch call (a few microseconds) would exceed what routing saves there, and such small
    products are not routed anyway (the same rule as the kernels' ``_MIN_ROUTED_ROWS``).
    """

    def __init__(self, energy: Callable[[Tensor], Tensor]):
        self.energy = energy
        self._cache = _TransposeCache()  # W^T per weight, for this energy's evaluations
        self._active = onednn_available()
        if callable(getattr(energy, "value_and_grad", None)):
            self.value_and_grad = self._value_and_grad

    def _routes(self, z: Tensor) -> bool:
        return self._active and (torch.compiler.is_compiling() or z.ndim != 2
                                 or z.shape[0] >= _MIN_ROUTED_ROWS)

    def __call__(self, z: Tensor) -> Tensor:
        if not self._routes(z):
            return self.energy(z)
        with _FastLinearMode(self._cache):
            return self.energy(z)

    def _value_and_grad(self, z: Tensor) -> Any:
        if not self._routes(z):
            return self.energy.value_and_grad(z)  # type: ignore[attr-defined]
        with _FastLinearMode(self._cache):
            return self.energy.value_and_grad(z)  # type: ignore[attr-defined]
