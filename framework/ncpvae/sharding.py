"""One way to shard work: a :class:`ShardGroup` (rank, world size, process group) and the row
block it scopes.

Under ``torchrun`` the ranks of a run split the rows of each global batch (training examples,
a fit's minibatch, a sampler's chains): rank ``r`` holds the ``r``-th contiguous part. The run
context (:class:`ncpvae.run.distributed.DistContext`) holds the run's group
(``DistContext.shards``) and hands it to fits (``LearnedPrior.fit(..., shards=...)``) and
samplers (``Sampler.run(..., shards=...)``, ``Sampler.sample_prior(..., shards=...)``). One
process is the group of world size 1, where every method below is the identity (sums over one
rank, a shard that is the whole batch), so code written against a group needs no branch for the
single-process case.

Per-row randomness. For a split run to give the *same numbers* as one process, every random
draw with one row per batch example (or chain) must be the single-process draw, restricted to
this rank's rows. Inside :meth:`ShardGroup.rows` (the row block of a group of world size > 1;
:func:`row_shard` opens one directly), :func:`randn_rows`, :func:`rand_rows` and
:func:`randint_rows` draw the full ``(..., total, ...)`` noise from the (identically seeded)
generator and keep this rank's rows, so the generator advances exactly as in one process.
Outside a block they are plain ``torch.randn``/``rand``/``randint``. This is the one mechanism
through which per-row noise is drawn: :func:`ncpvae.reparameterize` uses it for the training
noise, and a sampler's :meth:`~ncpvae.Sampler._randn`/:meth:`~ncpvae.Sampler._rand` for the
per-chain noise (chains are dimension 0), so nobody needs to replace a sampler's methods.

Contract for objective and sampler authors: draw per-example noise through
:func:`ncpvae.reparameterize`, the sampler's ``_randn``/``_rand`` or these functions, never
with a bare ``torch.randn`` sized by the local batch (a bare draw is still valid but differs
from the single-process run). Batch-level terms (a capacity or free-bits term on the
batch-mean KL) take the mean over the **global** batch with :func:`global_batch_mean`: inside a
row block the shard sums are summed over the ranks (a differentiable all-reduce), so loss and
gradients are the single-process ones up to float reduction order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def contiguous_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(offset, rows)`` of rank ``rank``'s contiguous part of ``total`` rows split over
    ``world_size`` ranks: the first ``total % world_size`` ranks get one row more."""
    base, extra = divmod(int(total), int(world_size))
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ShardGroup:
    """This process is ``rank`` of ``world_size`` ranks that split the rows of every global
    batch, talking over a ``torch.distributed`` process ``group`` (None: the default group).

    ``ShardGroup()`` is one process (world size 1): every method is then the identity and no
    collective is called. With several ranks every rank must call the collectives
    (:meth:`all_reduce_sum`, :meth:`gather_rows`, :meth:`map_rows`, :meth:`sum_gradients`,
    :meth:`all_gather_rows`, :meth:`all_gather_object`, a :func:`global_batch_mean` inside
    :meth:`rows`) in the same order. Sums travel in float64, so they are the same on every
    rank; only the float reduction order differs from one process.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise ValueError(f"invalid shard group: rank {self.rank} of {self.world_size}")

    @classmethod
    def from_process_group(cls, group: Any = None) -> ShardGroup | None:
        """The group of the initialized ``torch.distributed`` process group (``group`` or the
        default one); None when none is initialized or it has one rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size(group)
        if world < 2:
            return None
        return cls(dist.get_rank(group), world, group)

    # -- rows ------------------------------------------------------------------------------------

    def bounds(self, total: int) -> tuple[int, int]:
        """``(offset, rows)`` of this rank's contiguous part of ``total`` rows (the first
        ``total % world_size`` ranks get one row more); ``(0, total)`` in one process."""
        return contiguous_bounds(total, self.rank, self.world_size)

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous part of ``rows`` ``(B, ...)``: ``(rows_r, ...)`` (``rows``
        itself in one process)."""
        if self.world_size == 1:
            return rows
        offset, count = self.bounds(len(rows))
        return rows[offset:offset + count]

    @contextmanager
    def rows(self, total: int) -> Iterator[tuple[int, int]]:
        """Within the block this rank holds its rows of a global batch of ``total`` rows (yields
        ``(offset, rows)``): per-row draws (:func:`randn_rows` and co., hence
        :func:`ncpvae.reparameterize` and a sampler's ``_randn``/``_rand``) are the
        single-process draws' rows, and :func:`global_batch_mean` sums over the ranks. In one
        process it yields ``(0, total)`` and changes nothing."""
        if self.world_size == 1:
            yield 0, int(total)
            return
        offset, count = self.bounds(total)
        with row_shard(offset, count, total, sum_over_shards=self.sum_over_shards):
            yield offset, count

    def mean_part(self, values: Tensor, total: int) -> Tensor:
        """This rank's part of the mean over a global batch of ``total`` rows whose rows
        ``values`` ``(rows_r, ...)`` this rank holds: ``values.sum() / total`` (the parts sum
        to the global mean over the ranks, so with :meth:`sum_gradients` every rank gets the
        gradient of the global mean); ``values.mean()`` in one process."""
        if self.world_size == 1:
            return values.mean()
        return values.sum() / total

    # -- collectives -----------------------------------------------------------------------------

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` (same shape on every rank) over the ranks, summed in float64 and
        returned in ``tensor``'s dtype and device (a new tensor; ``tensor`` in one process)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        wire = tensor.detach().to(self._wire_device(tensor), torch.float64).clone()
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.group)
        return wire.to(device=tensor.device, dtype=tensor.dtype)

    def sum_over_shards(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` (same shape on every rank) over the ranks, **differentiable**: the
        backward pass sums the gradients arriving on every rank (the gradient of
        ``y = sum_r x_r`` with respect to ``x_r``), so a loss term of the sum has the
        single-process gradient. Reduced in float64 (the result has ``tensor``'s dtype);
        ``tensor`` itself in one process."""
        if self.world_size == 1:
            return tensor
        return _SumOverRanks.apply(tensor.to(torch.float64), self.group).to(tensor.dtype)

    def gather_rows(self, local: Tensor, total: int) -> Tensor:
        """The ``(total, ...)`` tensor whose rows :meth:`bounds` are each rank's ``local`` rows,
        on every rank (a zero-padded float64 sum, so every row is exactly its rank's value)."""
        offset, count = self.bounds(total)
        if len(local) != count:
            raise ValueError(f"rank {self.rank} holds {len(local)} rows, its shard of {total} "
                             f"has {count}")
        if self.world_size == 1:
            return local
        full = local.new_zeros((int(total), *local.shape[1:]))
        full[offset:offset + count] = local.detach()
        return self.all_reduce_sum(full)

    def map_rows(self, fn: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
        """``fn`` ``(n, ...) -> (n,)`` over ``rows`` ``(B, ...)``, each rank evaluating its
        contiguous part; the whole ``(B,)`` result on every rank (in ``fn``'s dtype)."""
        if self.world_size == 1:
            return fn(rows)
        local = self.shard(rows)
        out = fn(local) if len(local) else rows.new_zeros(0)
        return self.gather_rows(out, len(rows))

    def all_gather_rows(self, block: Tensor, dim: int = 0) -> Tensor:
        """Every rank's ``block`` concatenated along ``dim`` in rank order (the global order of
        contiguous shards), exactly (any dtype), on every rank; ``block`` in one process."""
        if self.world_size == 1:
            return block
        parts = self.all_gather_object(block.detach().cpu())
        return torch.cat([p.to(block.device) for p in parts], dim=dim)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_gradients(self, params: list[Tensor] | list[nn.Parameter]) -> None:
        """Replace each parameter's ``.grad`` by its sum over the ranks (one all-reduce of all
        of them; a missing gradient counts as zeros). Nothing to do in one process."""
        if self.world_size == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = self.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        start = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = total[start:start + g.numel()].view_as(g).to(g.dtype)
            start += g.numel()

    def _wire_device(self, tensor: Tensor) -> torch.device:
        """Where a collective's buffer lives: the tensor's device under NCCL, else the CPU."""
        import torch.distributed as dist

        backend = dist.get_backend(self.group)
        return tensor.device if backend == "nccl" else torch.device("cpu")


#: one process: the group of world size 1 (every method the identity); the default wherever a
#: group is optional
ONE_PROCESS = ShardGroup()


class _SumOverRanks(torch.autograd.Function):
    """``y = sum over ranks of x`` (all-reduce) whose backward all-reduces the gradients: every
    rank's ``y`` depends on every rank's ``x``, so ``dL/dx_r = sum_r' dL_r'/dy``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        import torch.distributed as dist

        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


# ---------------------------------------------------------------------------------------------
# the row block: which rows of a global batch this process holds while a block is open


@dataclass(frozen=True)
class RowShard:
    """This process holds rows ``[offset, offset + rows)`` of a global batch of ``total`` rows.

    ``sum_over_shards`` maps a tensor (same shape in every shard) to its sum over all shards,
    differentiably (:meth:`ShardGroup.sum_over_shards`); None when the shards cannot talk (then
    :func:`global_batch_mean` is refused inside the shard)."""

    offset: int
    rows: int
    total: int
    sum_over_shards: Callable[[Tensor], Tensor] | None = field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.offset >= 0 and self.rows >= 0 and self.offset + self.rows <= self.total):
            raise ValueError(f"invalid row shard: rows [{self.offset}, {self.offset + self.rows})"
                             f" of a batch of {self.total}")

    @property
    def stop(self) -> int:
        return self.offset + self.rows


_CURRENT: ContextVar[RowShard | None] = ContextVar("ncpvae_row_shard", default=None)


@contextmanager
def row_shard(offset: int, rows: int, total: int, *,
              sum_over_shards: Callable[[Tensor], Tensor] | None = None) -> Iterator[RowShard]:
    """The row block :meth:`ShardGroup.rows` opens, given by hand (e.g. to simulate the ranks
    of a split run in one process): within it per-row draws (:func:`randn_rows`) are the
    single-process draws' rows and :func:`global_batch_mean` sums over the shards with
    ``sum_over_shards`` (see :class:`RowShard`)."""
    shard = RowShard(int(offset), int(rows), int(total), sum_over_shards)
    token = _CURRENT.set(shard)
    try:
        yield shard
    finally:
        _CURRENT.reset(token)


def current_row_shard() -> RowShard | None:
    """The active :class:`RowShard`, or None (one process, or outside a sharded batch)."""
    return _CURRENT.get()


def randn_rows(shape: torch.Size | tuple[int, ...], *, dim: int = -2,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise of (local) ``shape`` whose dimension ``dim`` is the batch.

    Outside a row block: ``torch.randn(shape)``. Inside one, ``shape[dim]`` must equal the
    block's ``rows``: the full noise with ``total`` rows along ``dim`` is drawn (the generator
    advances as in one process) and rows ``[offset, offset + rows)`` are returned.
    """
    return _rows(torch.randn, shape, dim, generator=generator, device=device, dtype=dtype)


def rand_rows(shape: torch.Size | tuple[int, ...], *, dim: int = -2,
              generator: torch.Generator | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> Tensor:
    """Uniform ``[0, 1)`` noise, rows as in :func:`randn_rows`."""
    return _rows(torch.rand, shape, dim, generator=generator, device=device, dtype=dtype)


def randint_rows(high: int, shape: torch.Size | tuple[int, ...], *, dim: int = -2,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Integers uniform in ``[0, high)`` (int64), rows as in :func:`randn_rows` (e.g. one row
    of minibatch indices per chain, ``dim = 0``)."""
    def draw(size: list[int] | tuple[int, ...], **kwargs) -> Tensor:
        return torch.randint(int(high), tuple(size), **kwargs)

    return _rows(draw, shape, dim, generator=generator, device=device)


def global_batch_mean(values: Tensor, dim: int = 0) -> Tensor:
    """The mean of ``values`` over the **global** batch along its batch dimension ``dim``.

    Outside a row block (one process) it is exactly ``values.mean(dim)``. Inside one (a rank
    holding ``rows`` of ``total`` rows, ``values.shape[dim] == rows``) it is
    ``sum_over_shards(values.sum(dim)) / total``: the same value on every rank, and (the sum
    being a differentiable all-reduce under torchrun) gradients reach every rank's rows as in
    one process. Use it for batch-level terms that are nonlinear in a batch mean (a capacity or
    free-bits term on the batch-mean KL); every rank must call it, in the same order. Returns
    ``values``'s shape without ``dim``.
    """
    shard = _CURRENT.get()
    if shard is None or shard.rows == shard.total:
        return values.mean(dim)
    axis = dim % values.ndim if values.ndim else 0
    if values.ndim == 0 or values.shape[axis] != shard.rows:
        got = values.shape[axis] if values.ndim else 0
        raise RuntimeError(
            f"a row shard of {shard.rows} of {shard.total} rows is active, but the batch mean "
            f"is taken over {got} rows in dimension {dim}; pass this rank's rows of the batch")
    if shard.sum_over_shards is None:
        raise RuntimeError(
            "global_batch_mean inside a row shard that has no sum over the shards; open the "
            "shard with ShardGroup.rows (or row_shard(..., sum_over_shards=...))")
    return shard.sum_over_shards(values.sum(axis)) / shard.total


def _rows(draw, shape, dim: int, **kwargs) -> Tensor:
    shape = tuple(int(s) for s in shape)
    shard = _CURRENT.get()
    if shard is None or shard.rows == shard.total:
        return draw(shape, **kwargs)
    axis = dim % len(shape) if shape else 0
    if not shape or shape[axis] != shard.rows:
        raise RuntimeError(
            f"a row shard of {shard.rows} of {shard.total} rows is active, but the "
            f"draw of shape {shape} has {shape[axis] if shape else 0} rows in dimension {dim}; "
            "per-example noise must have the batch in that dimension")
    full = list(shape)
    full[axis] = shard.total
    noise = draw(full, **kwargs)
    return noise.narrow(axis, shard.offset, shard.rows).contiguous()
