"""Row shards: one process holds rows ``[offset, offset + rows)`` of a global batch of ``total``.

Under ``torchrun`` every rank computes the objective on its own contiguous part of each global
batch (see :mod:`ncpvae.run.distributed`). For a distributed run to give the *same numbers* as a
single process, every random draw that has one row per batch example must be the single-process
draw, restricted to this rank's rows. :func:`randn_rows` does that: inside :func:`row_shard`, it
draws the full ``(..., total, ...)`` noise from the (identically seeded) generator and keeps this
rank's rows, so the generator advances exactly as in one process and the kept rows are the
single-process rows. Outside a shard (one process, the default) it is a plain ``torch.randn``.

Contract for objective and sampler authors: draw per-example noise through
:func:`ncpvae.reparameterize` (or :func:`randn_rows`), never with a bare ``torch.randn`` sized by
the local batch — a bare draw is still valid but differs from the single-process run, and ranks
seeded alike would draw the same noise for different examples. Batch-level terms (a capacity or
free-bits term on the batch-mean KL) take the mean over the **global** batch with
:func:`global_batch_mean`: inside a row shard that spans processes (``DistContext.sharded`` passes
its differentiable all-reduce as ``sum_over_shards``) the shard sums are summed over the ranks, so
loss and gradients are the single-process ones up to float reduction order. Per-example losses
averaged over the batch with a plain ``.mean()`` are already right under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowShard:
    """This process holds rows ``[offset, offset + rows)`` of a global batch of ``total`` rows.

    ``sum_over_shards`` maps a tensor (same shape in every shard) to its sum over all shards,
    differentiably (under torchrun: an all-reduce over the ranks); None when the shards cannot
    talk (then :func:`global_batch_mean` is refused inside the shard)."""

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


def contiguous_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(offset, rows)`` of rank ``rank``'s contiguous part of ``total`` rows split over
    ``world_size`` ranks: the first ``total % world_size`` ranks get one row more."""
    base, extra = divmod(int(total), int(world_size))
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


@contextmanager
def row_shard(offset: int, rows: int, total: int, *,
              sum_over_shards: Callable[[Tensor], Tensor] | None = None) -> Iterator[RowShard]:
    """Within this block, per-row draws (:func:`randn_rows`) are single-process draws' rows and
    :func:`global_batch_mean` sums over the shards with ``sum_over_shards`` (see
    :class:`RowShard`)."""
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

    Outside a row shard: ``torch.randn(shape)``. Inside one, ``shape[dim]`` must equal the
    shard's ``rows``: the full noise with ``total`` rows along ``dim`` is drawn (the generator
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

    Outside a row shard (one process) it is exactly ``values.mean(dim)``. Inside one (a rank
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
            "shard with DistContext.sharded (or row_shard(..., sum_over_shards=...))")
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
