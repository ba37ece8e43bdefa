"""Running under ``torchrun``: a thin context over ``torch.distributed`` (no launcher of its own).

``torchrun --nproc_per_node=N -m ncpvae train CONFIG`` starts N processes with the environment
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``).
:func:`setup` reads them and joins the process group; a process started without them (plain
``ncpvae train``) gets a :class:`DistContext` of world size 1 with no process group, and every
helper below is then the identity, so a single process behaves exactly as before.

Backend and device (:class:`DistributedConfig`): ``backend = "auto"`` is ``nccl`` when the run's
device is CUDA (each rank on GPU ``LOCAL_RANK``) and ``gloo`` on CPU; ``device = "auto"`` picks
per rank. ``nccl`` on a CPU device is refused with a :class:`ConfigError`.

What the helpers guarantee:

- :attr:`DistContext.shards`: the run's one :class:`~ncpvae.ShardGroup` (rank, world size;
  world size 1 in one process and while rank 0 works alone), which the stages hand to fits and
  samplers; :meth:`DistContext.shard_bounds` / :meth:`DistContext.shard` /
  :meth:`DistContext.sharded` are its split: rank ``r`` takes the ``r``-th contiguous part of
  every global batch (sizes differ by at most one row), so the parts are disjoint, cover the
  batch and, concatenated in rank order, are the batch.
- :meth:`DistContext.all_reduce_sums`: sums of logged quantities over ranks (global numbers).
- :meth:`DistContext.gather_rows`: per-rank row blocks concatenated on rank 0 in rank order, which
  is the global (chain) order because shards are contiguous.
- :meth:`DistContext.agree`: every rank reports ``ok`` or its error after a step (a stage's
  setup); if any rank failed, all ranks raise the same one-line error (the lowest failing rank's,
  naming it) at once instead of waiting in the next collective.
- Collectives time out after ``timeout_seconds`` (the process group's timeout), so no rank waits
  forever for a rank that died; :meth:`DistContext.main_only` runs a rank-0-only step (evaluation,
  plots) while the other ranks wait on a second group with the longer ``wait_seconds``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

import ncpvae.errors as errors
from ncpvae.component import StrictModel
from ncpvae.errors import ConfigError, NcpvaeError
from ncpvae.sharding import ONE_PROCESS, ShardGroup, contiguous_bounds

T = TypeVar("T")

#: the environment variables torchrun sets on every rank
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedConfig(StrictModel):
    """How ranks talk to each other when the run is launched with ``torchrun``."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl on CUDA devices, gloo on CPU")
    timeout_seconds: float = Field(
        120.0, gt=0, allow_inf_nan=False,
        description="a collective call (gradient all-reduce, gather, error check) that waits "
                    "longer than this fails instead of hanging")
    wait_seconds: float = Field(
        7200.0, gt=0, allow_inf_nan=False,
        description="how long the other ranks wait while rank 0 alone evaluates or plots")


#: environment variables that set :class:`DistributedConfig`'s fields (torchrun-level settings,
#: like torch's own ``TORCH_*``/``NCCL_*``: they change how ranks talk, never the results)
CONFIG_ENV = {"backend": "NCPVAE_DIST_BACKEND", "timeout_seconds": "NCPVAE_DIST_TIMEOUT",
              "wait_seconds": "NCPVAE_DIST_WAIT"}
#: a directory; when set, every rank appends the training indices it took to ``rank<R>.jsonl``
DEBUG_SHARDS_ENV = "NCPVAE_DEBUG_SHARDS"


def config_from_env() -> DistributedConfig:
    """:class:`DistributedConfig` from ``NCPVAE_DIST_BACKEND`` (auto/gloo/nccl),
    ``NCPVAE_DIST_TIMEOUT`` and ``NCPVAE_DIST_WAIT`` (seconds); unset ones keep their default."""
    from pydantic import ValidationError

    raw = {field: os.environ[env] for field, env in CONFIG_ENV.items() if os.environ.get(env)}
    try:
        return DistributedConfig.model_validate(raw)
    except ValidationError as exc:
        names = {CONFIG_ENV[str(e["loc"][0])]: e["msg"] for e in exc.errors() if e["loc"]}
        text = "; ".join(f"{env}={os.environ.get(env)!r}: {msg}" for env, msg in names.items())
        raise ConfigError(f"invalid distributed setting: {text}") from None


class DistributedError(NcpvaeError, RuntimeError):
    """Another rank failed, or the process group could not be set up."""


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "launch distributed runs with torchrun") from None


def launched_distributed() -> bool:
    """True when torchrun's variables are set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    present = [name for name in ENV_VARS if name in os.environ]
    if present and len(present) < len(ENV_VARS):
        missing = ", ".join(n for n in ENV_VARS if n not in os.environ)
        raise DistributedError(f"{', '.join(present)} set but {missing} missing; launch "
                               "distributed runs with torchrun (or set all three)")
    return len(present) == len(ENV_VARS)


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun), before any setup."""
    return int(os.environ.get("RANK", "0") or 0) if launched_distributed() else 0


def resolve_rank_device(name: str, local_rank: int = 0, *, distributed: bool = False
                        ) -> torch.device:
    """The device of this rank: ``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else
    ``cpu``; ``cuda`` without a GPU (or without GPU ``LOCAL_RANK``) is a :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA device is available; use 'auto' or "
                              "'cpu'")
        if not distributed:
            return torch.device("cuda")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"local rank {local_rank} needs GPU {local_rank} but this machine "
                              f"has {count}; start at most {count} processes per node "
                              "(torchrun --nproc_per_node) or use device = 'cpu'")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"unknown device '{name}'; use 'auto', 'cpu' or 'cuda'")
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``nccl`` on CUDA, ``gloo`` on CPU; ``nccl`` needs a CUDA device."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise ConfigError("distributed.backend = 'nccl' needs CUDA devices but this run's "
                              f"device is '{device}'; use backend 'gloo' (or 'auto') on CPU")
        if not dist.is_nccl_available():
            raise ConfigError("distributed.backend = 'nccl' but this PyTorch build has no NCCL; "
                              "use 'gloo'")
    elif backend == "gloo":
        if not dist.is_gloo_available():
            raise ConfigError("distributed.backend = 'gloo' but this PyTorch build has no gloo")
    else:
        raise ConfigError(f"unknown distributed backend '{backend}'; use auto, gloo or nccl")
    return backend


def _error_record(exc: BaseException) -> tuple[str, str]:
    """``(class name, one-line message)`` of an error, for the other ranks."""
    name = type(exc).__name__
    if isinstance(exc, NcpvaeError):
        return name, str(exc)
    return name, f"{name}: {exc}".splitlines()[0]


def _rebuild_error(name: str, message: str) -> NcpvaeError:
    """An error of the same ncpvae class (the CLI prints its message and exits 2)."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, NcpvaeError)):
        cls = DistributedError
    try:
        exc = cls(message)
    except Exception:  # noqa: BLE001 - a class with another constructor signature
        exc = DistributedError(message)
    return exc


def mark_agreed(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises (only rank 0 needs to print it)."""
    exc.ncpvae_agreed = True  # type: ignore[attr-defined]
    return exc


def should_report(exc: BaseException) -> bool:
    """Whether this process prints ``exc``: always on rank 0 (and without torchrun); on other
    ranks only errors that rank 0 does not also raise, so an agreed error is printed once."""
    try:
        rank = env_rank()
    except DistributedError:
        return True
    return rank == 0 or not getattr(exc, "ncpvae_agreed", False)


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, device and (maybe) a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (one process)
    config: DistributedConfig = field(default_factory=DistributedConfig)
    _wait_group: Any = None
    _solo: bool = False  # inside main_only: rank 0 works alone, the helpers act as one process

    # -- who am I -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when a process group is up (launched by torchrun, even with world size 1)."""
        return self.backend is not None

    @property
    def active(self) -> bool:
        """True when work is split across more than one rank right now (a process group of
        world size > 1, outside :meth:`main_only`)."""
        return self.backend is not None and self.world_size > 1 and not self._solo

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, prints progress and evaluates."""
        return self.rank == 0

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files and prints its report (rank 0, or the
        only process); the other ranks compute alongside and write nothing."""
        return self.is_main

    # -- sharding -------------------------------------------------------------------------------

    @property
    def shards(self) -> ShardGroup:
        """The ranks that split the work now: this rank of the process group while
        :attr:`active`, else one process (world size 1: every collective the identity)."""
        return ShardGroup(self.rank, self.world_size) if self.active else ONE_PROCESS

    def shard_bounds(self, total: int, rank: int | None = None) -> tuple[int, int]:
        """``(offset, rows)`` of rank ``rank``'s (default: this rank's) part of ``total`` rows:
        the first ``total % world_size`` ranks get one row more than the others."""
        rank = self.rank if rank is None else rank
        if self._solo:
            return 0, int(total)
        return contiguous_bounds(total, rank, self.world_size)

    def shard(self, index: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch ``index`` ``(B, ...)``."""
        offset, rows = self.shard_bounds(len(index))
        return index[offset:offset + rows]

    @contextmanager
    def sharded(self, total: int) -> Iterator[tuple[int, int]]:
        """Within the block this rank holds its rows of a global batch of ``total`` rows:
        per-example noise (:func:`ncpvae.reparameterize`) is the single-process noise's rows, and
        :func:`ncpvae.global_batch_mean` is the mean over every rank's rows (through
        :meth:`ShardGroup.sum_over_shards`; so every rank must run the same batch-level terms).
        Yields ``(offset, rows)`` (see :meth:`ShardGroup.rows`)."""
        with self.shards.rows(total) as bounds:
            yield bounds

    # -- collectives ----------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sums(self, values: Mapping[str, float | Tensor]) -> dict[str, float]:
        """``{key: sum over ranks}`` (float64 on the wire); every rank must pass the same keys."""
        keys = sorted(values)
        local = {k: float(values[k]) for k in keys}
        if not self.active or not keys:
            return local
        gathered = self._all_gather_object(keys)
        if any(g != keys for g in gathered):
            raise DistributedError(f"ranks logged different quantities: {gathered}")
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        buffer = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return dict(zip(keys, buffer.cpu().tolist()))

    def all_reduce_tensor_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` (same shape on every rank) over ranks; returns a new tensor."""
        return self.shards.all_reduce_sum(tensor) if self.active else tensor.clone()

    def gather_rows(self, block: Tensor, dim: int = 0) -> Tensor | None:
        """This rank's rows (its shard along ``dim``) gathered on rank 0 and concatenated in rank
        order — the global order of the sharded batch. Rank 0 gets the whole tensor (on its own
        device), other ranks None. Without a process group: ``block`` itself."""
        if not self.active:
            return block
        payload = block.detach().cpu()
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(payload, parts, dst=0)
        if not self.is_main:
            return None
        assert parts is not None
        return torch.cat([p.to(block.device) for p in parts], dim=dim)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on other ranks)."""
        if not self.active:
            return [obj]
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def broadcast_object(self, obj: T | None) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj  # type: ignore[return-value]
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_gather_object(self, obj: Any, group: Any = None) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    # -- errors ---------------------------------------------------------------------------------

    def check(self, error: BaseException | None, group: Any = None) -> None:
        """Exchange ``ok``/error with every rank; if any rank failed, raise on all of them.

        Every rank raises an error of the failing rank's ncpvae class with the same one-line
        message ``rank R: ...`` (R the lowest failing rank), marked as agreed so that only rank
        0 prints it; a rank whose own error is not an ncpvae error (a bug) re-raises it with its
        traceback instead."""
        if not self.active:
            if error is not None:
                raise error
            return
        record = None if error is None else _error_record(error)
        statuses = self._all_gather_object(record, group=group)
        failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
        if not failed:
            return
        rank, (name, message) = failed[0]
        if error is not None and not isinstance(error, NcpvaeError):
            raise error  # a bug on this rank: its own traceback (the others print one line)
        agreed = mark_agreed(_rebuild_error(name, f"rank {rank}: {message}"))
        if error is not None:
            raise agreed from error
        raise agreed from None

    def agree(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank, then :meth:`check`: either every rank succeeded (its
        result is returned) or every rank raises the first failing rank's error."""
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - reported to the others
            if not self.active:
                raise
            self.check(exc)
            raise  # pragma: no cover - check always raises here
        self.check(None)
        return result

    def main_only(self, step: Callable[[], T]) -> T | None:
        """Run ``step`` on rank 0 only; the other ranks wait (up to ``wait_seconds``) and then
        every rank raises rank 0's error if it failed. Returns ``step``'s result on rank 0."""
        if not self.active:
            return step()
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            self._solo = True
            try:
                result = step()
            except Exception as exc:  # noqa: BLE001 - reported to the others
                error = exc
            finally:
                self._solo = False
        self.check(error, group=self._wait_group)
        return result

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None
        self._wait_group = None


_current: DistContext | None = None


def current() -> DistContext:
    """The context of this process (world size 1, no process group, until :func:`setup`)."""
    return _current if _current is not None else DistContext()


def setup(device: str = "auto", config: DistributedConfig | None = None) -> DistContext:
    """Join the process group when launched by torchrun; else a one-process context.

    ``device`` is the run's ``device`` setting (``auto``/``cpu``/``cuda``), resolved per rank.
    Calling it again in the same process returns the existing context if it matches.
    """
    global _current
    config = config if config is not None else config_from_env()
    if not launched_distributed():
        return DistContext(device=resolve_rank_device(device), config=config)
    rank, world, local_rank = (_env_int(name) for name in ENV_VARS)
    if not (0 <= rank < world and local_rank >= 0):
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, "
                               f"WORLD_SIZE={world}, LOCAL_RANK={local_rank}")
    rank_device = resolve_rank_device(device, local_rank, distributed=True)
    backend = resolve_backend(config.backend, rank_device)
    if _current is not None and _current.enabled:
        if (_current.rank, _current.world_size, _current.backend) != (rank, world, backend):
            raise DistributedError("the process group is already set up with another backend")
        return _current
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=config.timeout_seconds),
                                **({"device_id": rank_device} if backend == "nccl" else {}))
        wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.wait_seconds))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the process group (rank {rank} of {world}, "
                               f"{backend}): {str(exc).splitlines()[0]}") from None
    _current = DistContext(rank, world, local_rank, rank_device, backend, config, wait_group)
    return _current


def teardown() -> None:
    """Leave the process group set up by :func:`setup` (no-op without one)."""
    global _current
    if _current is not None:
        _current.close()
    _current = None


def check_world_size(ctx: DistContext, state: Mapping[str, Any], what: Any) -> None:
    """Refuse to resume a checkpoint written by a run on another number of processes (a
    checkpoint without ``world_size`` was written by one process): the continuation is exact
    only on the same world size (the float reduction order of the gradients depends on it)."""
    saved = int(state.get("world_size", 1))
    if saved == ctx.world_size:
        return
    how = ("without torchrun (or torchrun --nproc_per_node=1)" if saved == 1
           else f"with torchrun --nproc_per_node={saved}")
    raise ConfigError(f"{what} was written by a run on {saved} process(es) but this one has "
                      f"{ctx.world_size}; resume it {how}, the world size it was started with")


# ---------------------------------------------------------------------------------------------
# training: the objective under DistributedDataParallel


class _LossModule(nn.Module):
    """The objective's loss as a forward pass, so that DistributedDataParallel sees it (an
    objective calls ``model.encode``/``decode``, which DDP would not intercept)."""

    def __init__(self, model: nn.Module, prior: nn.Module, objective: Any):
        super().__init__()
        self.model = model
        self.prior = prior
        self.objective = objective

    def forward(self, x: Tensor, step: int) -> dict[str, Tensor]:
        return self.objective.loss(x, self.model, self.prior, step=step)


def loss_function(ctx: DistContext, model: nn.Module, prior: nn.Module, objective: Any
                  ) -> Callable[[Tensor, int], dict[str, Tensor]]:
    """``loss(x, step) -> objective.loss(x, model, prior, step=step)``; on several ranks the
    model and the prior's trainable parameters are wrapped in DistributedDataParallel, whose
    backward averages the gradients over ranks (scale each rank's loss by
    ``rows * world_size / batch`` to get the global batch-mean gradient, see
    :meth:`DistContext.loss_weight`)."""
    if not ctx.active:
        return lambda x, step: objective.loss(x, model, prior, step=step)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(_LossModule(model, prior, objective), device_ids=device_ids)
    return lambda x, step: ddp(x, step)


def loss_weight(ctx: DistContext, rows: int, total: int) -> float:
    """Factor on a rank's batch-mean loss of ``rows`` of ``total`` examples such that DDP's
    average over ranks is the gradient of the global batch mean (1 for equal shards)."""
    if not ctx.active or rows * ctx.world_size == total:
        return 1.0
    return rows * ctx.world_size / total


def log_shard(ctx: DistContext, epoch: int, index: Tensor) -> None:
    """With ``NCPVAE_DEBUG_SHARDS=DIR``, append ``{"epoch", "indices"}`` of this rank's training
    images of one epoch to ``DIR/rank<R>.jsonl`` (a test hook: it writes on every rank)."""
    folder = os.environ.get(DEBUG_SHARDS_ENV)
    if not folder:
        return
    import json
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"rank{ctx.rank}.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": epoch, "world_size": ctx.world_size,
                                 "indices": index.tolist()}) + "\n")


def picklable(obj: Any) -> bool:
    """Whether ``obj`` can travel between ranks (an error record, a diagnostics dict)."""
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001
        return False
    return True
