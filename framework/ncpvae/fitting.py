"""Building blocks of a learned prior's epoch loop (shared by the ncp, ebm and flow plugins).

- :class:`EarlyStopping`: iterates the epochs (with an optional progress bar) of a budget of at
  least ``min_steps`` optimizer steps, records each epoch's held-out loss, keeps a copy of the
  state dict at the best one, stops after ``patience`` epochs without an improvement larger
  than twice its paired standard error, and restores the best weights.
- :class:`EpochLosses`: the minibatch losses of one epoch, kept on the device and read once at
  the epoch's end (a non-finite loss raises :class:`~ncpvae.NonFiniteError` naming the step).
- :func:`minibatch_step`: one optimizer step on a global minibatch, in one process or data
  parallel under ``torchrun`` (over a :class:`~ncpvae.sharding.ShardGroup`).

None of them draws random numbers, so a fit that uses them consumes its generator exactly as a
hand-written loop would.

Data-parallel fits (``LearnedPrior.fit(..., shards=ShardGroup)``; a fit always receives a group,
of world size 1 in one process, where every collective is the identity), what is sharded and
what not: every rank holds all encodings and an identically seeded generator, and makes every random draw
of the fit in full (the epoch's positives, negatives and permutation, the held-out draws), so
the generator advances exactly as in one process. The network's forward and backward passes,
the expensive part, are sharded: each rank evaluates its contiguous rows of every minibatch
(and of the held-out set) and the gradients are summed over the ranks. The logged losses and
the held-out metrics are computed from all-reduced numbers, so they are the same on every rank
and so is the early-stopping decision; the parameters stay identical on every rank.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ncpvae.errors import NonFiniteError
from ncpvae.sharding import ONE_PROCESS, ShardGroup

__all__ = ["EarlyStopping", "EpochLosses", "ShardGroup", "minibatch_step", "paired_se"]


class EpochLosses:
    """The minibatch losses of one epoch: 0-dim tensors (kept on the device) and batch sizes."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.sizes: list[int] = []

    def add(self, loss: Tensor, size: int) -> None:
        """Record one step's (detached) loss over ``size`` examples."""
        self.losses.append(loss.detach())
        self.sizes.append(int(size))

    def summary(self, who: str, epoch: int, remedy: str,
                shards: ShardGroup = ONE_PROCESS) -> dict[str, float]:
        """``train_loss_mean`` (weighted by the batch sizes) and ``train_loss_min`` in float64:
        one host read. Raises :class:`NonFiniteError` ``"<who> fit: the loss became NaN or inf
        in epoch E, step S of N; <remedy>"`` if any step's loss is not finite.

        Over several ranks (``shards``) each recorded loss is this rank's part of its batch mean
        (see :func:`minibatch_step`): the parts are summed over the ranks first (one all-reduce
        per epoch), so every rank logs, and checks, the global batch means."""
        if not self.losses:
            raise ValueError(f"{who} fit: epoch {epoch} took no steps")
        batch_losses = torch.stack(self.losses).to(torch.float64)
        batch_losses = shards.all_reduce_sum(batch_losses)
        bad = ~torch.isfinite(batch_losses)
        if bad.any():
            first = int(torch.nonzero(bad)[0, 0]) + 1
            raise NonFiniteError(f"{who} fit: the loss became NaN or inf in epoch {epoch}, step "
                                 f"{first} of {len(self.losses)}; {remedy}")
        weights = torch.tensor(self.sizes, dtype=torch.float64, device=batch_losses.device)
        return {"train_loss_mean": float((batch_losses * weights).sum() / weights.sum()),
                "train_loss_min": float(batch_losses.min())}


def minibatch_step(optimizer: torch.optim.Optimizer, params: list[Tensor],
                   loss: Callable[[Tensor, str], Tensor], index: Tensor,
                   shards: ShardGroup = ONE_PROCESS) -> Tensor:
    """One optimizer step on the mean loss over the global minibatch ``index`` ``(B,)``.

    ``loss(rows, reduction)`` is the loss over the examples ``rows`` reduced by ``"mean"`` or
    ``"sum"``. One process (``shards`` of world size 1): a step on ``loss(index, "mean")``.
    Data parallel, each rank takes its contiguous rows of ``index`` and back-propagates
    ``loss(rows, "sum") / B``; the gradients of ``params`` are then summed over the ranks
    (:meth:`ShardGroup.sum_gradients`), which gives every rank the gradient of the global batch
    mean, and every rank takes the same step. Returns the detached loss: the batch mean, or on
    several ranks this rank's part of it (the parts sum to the batch mean over the ranks)."""
    optimizer.zero_grad(set_to_none=True)
    if shards.world_size == 1:
        value = loss(index, "mean")
        value.backward()
    else:
        rows = shards.shard(index)
        if len(rows):
            value = loss(rows, "sum") / len(index)
            value.backward()
        else:  # a batch smaller than the world: no rows here, zero gradients
            value = torch.zeros((), device=index.device)
        shards.sum_gradients(params)
    optimizer.step()
    return value.detach()


def paired_se(values: Tensor, reference: Tensor) -> float:
    """The standard error of ``mean(reference - values)`` over paired per-example values ``(n,)``
    (the same held-out examples scored twice); 0 for fewer than 2 examples."""
    diff = (reference.detach().to(torch.float64) - values.detach().to(torch.float64)).reshape(-1)
    if diff.numel() < 2:
        return 0.0
    return float(diff.std() / math.sqrt(diff.numel()))


class EarlyStopping:
    """Epochs of a fit with a step budget that does not shrink with the data, and early stopping
    that noise cannot trigger (docs/priors.md, "Fits that hold on small data").

    - At least ``min_steps`` optimizer steps: with ``steps_per_epoch`` steps an epoch the fit
      runs at least ``min_epochs = ceil(min_steps / steps_per_epoch)`` epochs, and ``epochs``
      (the maximum) is raised to ``min_epochs`` when smaller. No stop before ``min_epochs``.
    - Patience counts epochs but covers at least ``min_steps / 4`` steps: on small data an
      epoch is a handful of steps, and a few epochs of patience would be a few dozen steps.
    - The held-out loss is measured every ``check_every`` epochs (:meth:`due`), about
      ``CHECKS_PER_MIN_STEPS`` times within ``min_steps`` on small data (every epoch when an
      epoch is that long already), so a tiny data set does not pay one held-out evaluation per
      handful of steps; the last epoch is always checked.
    - An epoch *improves* only when its held-out loss is below the reference (the loss at the
      last improvement) by more than ``threshold`` standard errors. With per-example held-out
      ``values`` (the same examples every epoch, independent of each other: e.g. one value per
      held-out encoding, :func:`ncpvae.prior_fitting.per_encoding`) the SE is the paired one of
      the difference to the reference epoch's values (:func:`paired_se`); without, any lower
      loss improves.
      Patience runs out after ``patience`` epochs without an improvement.
    - The state dict of ``module`` at the lowest held-out loss (a deep copy) is restored by
      :meth:`restore`, whether or not that epoch counted as an improvement.

    Use::

        stopper = EarlyStopping(net, epochs=100, patience=10, min_steps=2000,
                                steps_per_epoch=len(batches), desc="fit x", log=log)
        for epoch in stopper:          # ends early once patience runs out
            ...                        # train one epoch
            if stopper.due(epoch):
                stopper.update(record, loss=heldout_loss, values=per_example_losses)
        stopper.restore()              # the best weights, progress bar closed

    ``history`` holds every checked epoch's record; ``log`` (if given) receives a copy of each.
    A NaN loss never improves.
    """

    #: held-out checks within ``min_steps`` when an epoch is shorter than ``min_steps / 25``
    CHECKS_PER_MIN_STEPS = 25

    def __init__(self, module: nn.Module, *, epochs: int, patience: int, min_steps: int = 0,
                 steps_per_epoch: int = 1, threshold: float = 2.0, desc: str = "fit",
                 progress: bool = False,
                 log: Callable[[dict[str, Any]], None] | None = None) -> None:
        if epochs < 1 or patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {epochs} and {patience}")
        if min_steps < 0 or steps_per_epoch < 1 or threshold < 0:
            raise ValueError(f"need min_steps >= 0, steps_per_epoch >= 1 and threshold >= 0, got "
                             f"{min_steps}, {steps_per_epoch} and {threshold}")
        self.module = module
        self.min_epochs = max(1, math.ceil(min_steps / steps_per_epoch))
        self.epochs = max(int(epochs), self.min_epochs)
        self.patience = max(int(patience), math.ceil(min_steps / 4 / steps_per_epoch))
        self.steps_per_epoch = int(steps_per_epoch)
        self.check_every = max(1, min_steps // (self.CHECKS_PER_MIN_STEPS * steps_per_epoch))
        self.epoch = 0
        self.threshold = float(threshold)
        self.log = log
        self.history: list[dict[str, float]] = []
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_record: dict[str, float] = {}
        self.reference_loss = math.inf
        self.reference_epoch = 0
        self._reference_values: Tensor | None = None
        self.stale = 0
        self.stopped = False
        self._best_state: dict[str, Any] | None = None
        self._desc = desc
        self._progress = bool(progress)
        self._bar: Any = None

    def __iter__(self) -> Iterator[int]:
        from tqdm import tqdm

        self._bar = tqdm(range(1, self.epochs + 1), desc=self._desc, unit="epoch",
                         disable=not self._progress, leave=False)
        for epoch in self._bar:
            self.epoch = epoch
            yield epoch
            if self.stopped:
                break

    def due(self, epoch: int) -> bool:
        """Whether the held-out loss is measured (and :meth:`update` called) after ``epoch``."""
        return epoch % self.check_every == 0 or epoch == self.epochs

    def improves(self, loss: float, values: Tensor | None = None) -> bool:
        """Whether ``loss`` (with its per-example ``values``) is below the reference by more
        than ``threshold`` paired standard errors."""
        if not loss < self.reference_loss:  # NaN never improves
            return False
        if values is None or self._reference_values is None or (
                values.shape != self._reference_values.shape):
            return True
        se = paired_se(values, self._reference_values)
        return self.reference_loss - loss > self.threshold * se

    def update(self, record: Mapping[str, float], *, loss: float, values: Tensor | None = None,
               postfix: Mapping[str, str] | None = None) -> bool:
        """Record the current epoch's check (``record`` of plain floats; ``loss`` its held-out
        loss, lower is better, the mean of ``values`` ``(n,)`` when given: the per-example
        held-out losses, the same examples at every check). Returns True when the fit should
        stop: ``patience`` epochs since the last improvement, and ``min_epochs`` run. Outside
        the epoch loop each call counts as the next epoch."""
        if self._bar is None:  # driven by hand, without iterating
            self.epoch += 1
        record = dict(record)
        self.history.append(record)
        if self.log is not None:
            self.log(dict(record))
        if self._bar is not None and postfix:
            self._bar.set_postfix(**postfix)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best_record = loss, self.epoch, record
            self._best_state = copy.deepcopy(self.module.state_dict())
        if self.improves(loss, values):
            self.reference_loss = loss
            self._reference_values = None if values is None else values.detach().clone()
            self.reference_epoch = self.epoch
        self.stale = self.epoch - self.reference_epoch
        self.stopped = self.stale >= self.patience and self.epoch >= self.min_epochs
        return self.stopped

    def restore(self) -> None:
        """Close the progress bar and load the best epoch's state dict (if any epoch ran)."""
        if self._bar is not None:
            self._bar.close()
        if self._best_state is not None:
            self.module.load_state_dict(self._best_state)

    def summary(self, started: float, num_train: int, num_heldout: int) -> dict[str, Any]:
        """``epochs_run``, ``steps_run``, ``min_epochs``, ``stopped_early``, ``fit_seconds``
        (since ``started``, a ``time.perf_counter()`` value), ``num_train`` and
        ``num_heldout``."""
        return {"epochs_run": self.epoch,
                "steps_run": self.epoch * self.steps_per_epoch,
                "min_epochs": self.min_epochs,
                "stopped_early": self.epoch < self.epochs,
                "fit_seconds": time.perf_counter() - started,
                "num_train": int(num_train),
                "num_heldout": int(num_heldout)}
