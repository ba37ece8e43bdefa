"""Opt-in fast paths for energies: shape-aware kernels for frozen linear layers on the CPU
(:func:`onednn_linear`, ``Sampler.run(..., fast_linear=True)``), and energies compiled with
``torch.compile`` (:class:`CompiledEnergy`, ``compile_energy=True``); the two combine.

Inside :func:`onednn_linear`, every call of ``torch.nn.functional.linear`` (which ``nn.Linear``
uses) whose input is a float32 CPU tensor and whose weight and bias need no gradient runs
through :class:`_FastLinear`, which picks a kernel per product by its shape:

- wide layers (both sides >= 16 features) with >= 2,048 rows: oneDNN, forward and backward. On
  some CPUs (issue 11: a 2-core AMD EPYC) torch's default float32 ``mm`` (MKL) runs at about half
  the speed of oneDNN; on this project's current host they are within ~10 %, MKL ahead at 1,024
  rows and oneDNN at 4,096 (``benchmarks/bench_blackjax.py``);
- the input gradient of a narrow layer (fewer than 16 inputs: the first layer of a prior's
  network on a latent space): computed transposed, 3-4x faster than MKL's ``grad @ W``;
- the input gradient of a one-output layer: a broadcast product instead of an outer-product GEMM.

Every other call (other devices or dtypes, trainable weights) falls back to the original
function. So it applies to any energy a user passes — a learned prior's, a posterior through a
decoder — without knowing its structure.

Precision: every path is float32 products with float32 accumulation; they differ from the
default only in summation order (relative differences ~1e-7 per product, see
``tests/test_samplers_contract.py``), not in precision. Seeded chains are therefore not
bit-identical to the default path, which is why the fast path is opt-in and off by default.
The patch is process-wide while the context is open (do not run other float32 linear layers in
other threads meanwhile if you need their default rounding).
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ncpvae.errors import ConfigError
from ncpvae.mcmc.kernels import energy_and_grad


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
_HAS_OPAQUE_OP = hasattr(torch.library, "register_fake")
if _HAS_OPAQUE_OP:
    _LIBRARY = torch.library.Library("ncpvae", "DEF")
    _LIBRARY.define("onednn_mm(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    _LIBRARY.impl("onednn_mm", _raw_onednn_mm, "CPU")

    @torch.library.register_fake("ncpvae::onednn_mm", lib=_LIBRARY)
    def _onednn_mm_shape(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))


def _onednn_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a 2-D float32 ``x`` ``(n, in)`` and ``weight`` ``(out, in)``."""
    if _HAS_OPAQUE_OP and torch.compiler.is_compiling():
        return torch.ops.ncpvae.onednn_mm(x, weight, bias)
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
    return _ORIGINAL_LINEAR(x, weight, bias)


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


_ORIGINAL_LINEAR = F.linear
# W^T of the wide weights seen while the context is open, keyed by (data_ptr, version, shape);
# None while no context is open. Compiled code transposes inside its graph instead.
_transposed: dict[tuple[int, int, tuple[int, ...]], Tensor] | None = None
_depth = 0


def _backward_weight(weight: Tensor, rows: int, compiling: bool) -> Tensor | None:
    """Contiguous ``W^T`` for a wide layer's oneDNN backward (cached while the context is open,
    transposed in the graph when compiling); None for every other layer, which needs none."""
    if not _wide(rows, weight):
        return None
    if compiling or _transposed is None:
        return weight.t().contiguous()
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    weight_t = _transposed.get(key)
    if weight_t is None:
        weight_t = _transposed[key] = weight.t().contiguous()
    return weight_t


def _eligible(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return not (input.device.type != "cpu" or input.dtype != torch.float32
                or weight.dtype != torch.float32 or weight.requires_grad
                or (bias is not None and (bias.requires_grad or bias.dtype != torch.float32))
                or input.ndim < 1 or weight.ndim != 2 or weight.is_sparse)


def _onednn_f_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` while :func:`onednn_linear` is open: one module-level function, so that
    compiled code that traced it stays valid across contexts."""
    compiling = torch.compiler.is_compiling()
    if not _eligible(input, weight, bias) or (
            not compiling and input.numel() < _MIN_ROUTED_ROWS * weight.shape[1]):
        return _ORIGINAL_LINEAR(input, weight, bias)
    flat = input.reshape(-1, input.shape[-1]).contiguous()
    if compiling or (input.requires_grad and torch.is_grad_enabled()):
        out = _FastLinear.apply(flat, weight, bias,
                                _backward_weight(weight, flat.shape[0], compiling))
    else:
        out = _linear_kernel(flat, weight, bias)
    return out.reshape(*input.shape[:-1], weight.shape[0])


@contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[bool]:
    """Route eligible ``F.linear`` calls through oneDNN while the context is open (see the
    module docstring); yields whether the fast path is active (False when ``enabled`` is
    False or this torch build lacks oneDNN, in which case nothing changes). Contexts nest."""
    global _transposed, _depth
    if not enabled or not onednn_available():
        yield False
        return
    if _depth == 0:
        _transposed = {}
        F.linear = _onednn_f_linear
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            F.linear = _ORIGINAL_LINEAR
            _transposed = None


# glibc's malloc options (mallopt(3)) and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_ARENA_MAX")
_heap_retained: bool | None = None


def retain_freed_memory(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20
                        ) -> bool:
    """Have glibc's ``malloc`` keep freed memory in the process instead of returning it to the
    operating system at once; what :class:`CompiledEnergy` does on its first compilation.

    A compiled sampler step allocates and frees its intermediates (a few MB at 1,024 chains of
    the benchmark MLP) on every call. With glibc's default, adaptive thresholds, the freed
    memory at the top of the heap is often trimmed and the next step page-faults it back:
    measured ~110-150 minor page faults per step, and the compiled MALA step 3-13 % slower than
    the eager step around the same compiled energy at 1,024 chains of the benchmark MLP; no
    faults, and 5-9 % faster than the eager step, with these settings. This sets
    ``M_TRIM_THRESHOLD`` (keep up to ``trim_threshold`` bytes of free memory at the heap's top)
    and ``M_MMAP_THRESHOLD`` (serve blocks below ``mmap_threshold`` bytes from the heap) for
    the whole process, once: the same as starting Python with ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_`` set. The cost is memory: up to ``trim_threshold`` freed bytes
    stay with the process.

    Does nothing, and returns False, where the C library is not glibc or where the user set any
    ``MALLOC_*_`` variable of glibc's malloc (their choice wins); True once set.
    """
    global _heap_retained
    if _heap_retained is None:
        _heap_retained = False
        if not any(name in os.environ for name in _MALLOC_ENV) and \
                platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                _heap_retained = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)
                                      and mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
            except (OSError, AttributeError):  # no mallopt in this process's C library
                pass
    return _heap_retained


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

    ``fast_linear = True`` (or an open :func:`onednn_linear` context, as in
    ``Sampler.run(..., compile_energy=True, fast_linear=True)``) traces the energy with its
    eligible linear layers routed through oneDNN: the compiled function then calls oneDNN for
    the matrix products (forward and the input gradient) and Inductor's fused kernels for the
    elementwise work in between, the fastest CPU path in ``benchmarks/bench_blackjax.py``.

    On the CPU, more than ``block_rows`` chains are evaluated in near-equal row blocks of at most
    that many (energies are batch-separable, so this changes nothing but speed): the fused
    kernels' intermediates, ``(block, hidden)``, then stay in cache. 4,096 chains of the
    benchmark MLP ran ~12-15 % faster in blocks of 512-1,024 than in one call. Blocks of two
    sizes at most (e.g. 1,020 and 1,021 rows), so at most two compilations per chain count.
    ``block_rows=None`` evaluates all chains at once.

    The first compilation also calls :func:`retain_freed_memory` (glibc only, and not where a
    ``MALLOC_*_`` variable is set): the compiled steps' per-call buffers then stop being
    page-faulted back from the operating system every step, for the whole process.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor], fast_linear: bool = False,
                 block_rows: int | None = 1024):
        if block_rows is not None and (isinstance(block_rows, bool)
                                       or not isinstance(block_rows, int) or block_rows < 1):
            raise ConfigError(f"block_rows must be a positive integer or None, got "
                              f"{block_rows!r}")
        self.energy = energy
        self.fast_linear = fast_linear
        self.block_rows = block_rows
        self.failure: str | None = None
        self._compiled: Callable[[Tensor], Any] | None = None
        self._transitions: dict[Callable[..., Any], _CompiledTransition] = {}

    def __call__(self, z: Tensor) -> Tensor:
        with onednn_linear(self.fast_linear):
            return self.energy(z)

    def _summed(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = self.energy(z)
        return u.sum(), u

    def _blocks(self, z: Tensor) -> tuple[Tensor, ...]:
        """``z`` ``(C, D)`` split into ``ceil(C / block_rows)`` blocks whose sizes differ by at
        most one row (CPU only; one block otherwise)."""
        rows = z.shape[0]
        if self.block_rows is None or z.device.type != "cpu" or rows <= self.block_rows:
            return (z,)
        count = -(-rows // self.block_rows)
        base, extra = divmod(rows, count)
        return z.split([base + 1] * extra + [base] * (count - extra))

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
        with onednn_linear(self.fast_linear):
            return self._value_and_grad(z)

    def _value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.failure is None:
            try:
                if self._compiled is None:
                    retain_freed_memory()
                    self._compiled = torch.compile(
                        torch.func.grad_and_value(self._summed, has_aux=True), dynamic=False)
                u, grad = self._blockwise(self._compiled, z.detach())
                return u.detach(), grad.detach()
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                self.failure = _failure_reason(exc)
                _warn_fallback(f"could not compile this energy ({self.failure}); sampling "
                               f"continues without it")
        return energy_and_grad(self.energy, z)

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
        with onednn_linear(energy.fast_linear):
            if self.failure is None and energy.failure is None:
                try:
                    if self._compiled is None:
                        retain_freed_memory()
                        traced, transition = energy._traced_value_and_grad, self.transition

                        def step(*inputs: Any) -> Any:
                            return transition(traced, *inputs)

                        self._compiled = torch.compile(step, dynamic=False)
                    return self._compiled(*args)
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
