"""Stage 1: train the VAE with the objective against the prior's tractable base.

:func:`train_vae` runs four steps with one concern each: :func:`start_training` (optimizer, data
order, and the states of a run resumed inside this stage), :func:`train_epochs` (the epoch loop:
:func:`train_epoch`, then each of :data:`EPOCH_CALLBACKS`, the metrics record and the epoch's
checkpoint), :func:`training_summary`, and :func:`write_vae_outputs` (the summary section and
the plots). :func:`ncpvae.run.vae_eval.evaluate_vae` gives the test-set terms of each epoch's
record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ncpvae import plots
from ncpvae.errors import ConfigError, NonFiniteError
from ncpvae.io import to_plain_json
from ncpvae.modes import eval_mode
from ncpvae.optim import adam
from ncpvae.run import directory as files
from ncpvae.run import distributed, hooks, progress, rng
from ncpvae.run.build import Run, encode_source
from ncpvae.run.precision import Precision
from ncpvae.run.vae_eval import evaluate_vae

#: training steps between reads of the on-device finiteness flags (and at every epoch's end):
#: the only host synchronisations of the step loop
FINITE_CHECK_INTERVAL = 50


def _first_bad_step(flags: list[Tensor], first_number: int, dist: Any) -> int | None:
    """The batch number of the first non-finite loss among ``flags`` (0-dim bool tensors, True
    = finite, for batch numbers ``first_number, first_number + 1, ...``), or None; one host
    read (under torchrun: the flags of every rank, summed, so every rank stops together)."""
    if not flags:
        return None
    bad = (~torch.stack(flags)).to(torch.float32)  # (k,)
    if dist.active:
        bad = dist.all_reduce_tensor_sum(bad)
    if not bool(bad.any()):
        return None
    return first_number + int(torch.nonzero(bad)[0, 0])


def _check_finite(flags: list[Tensor], last_number: int, epoch: int, step: int,
                  dist: Any) -> None:
    """Read the unread finiteness ``flags`` (batches up to ``last_number`` of ``epoch``; ``step``
    is the global step count after it) and clear them; raise :class:`NonFiniteError` naming the
    first bad epoch/step. Called before the epoch's checkpoint is written, so none holds a
    non-finite step's updates."""
    first = _first_bad_step(flags, last_number - len(flags) + 1, dist)
    flags.clear()
    if first is not None:
        kept = (f"the checkpoint of epoch {epoch - 1} is kept"
                if epoch > 1 else "no checkpoint had been written yet")
        raise NonFiniteError(
            f"non-finite training loss at epoch {epoch}, step {first} (global step "
            f"{step - last_number + first}); {kept}; lower train.lr or enable train.grad_clip")


def _batches(n: int, batch_size: int, generator: torch.Generator,
             max_steps: int | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size // 2:
        batches.pop()  # a tiny last batch adds gradient noise and nothing else
    return batches[:max_steps] if max_steps else batches


@dataclass
class TrainState:
    """What VAE training carries from epoch to epoch, and what an epoch's checkpoint restores.

    ``optimizer`` updates ``params`` (the model's and the prior's trainable parameters);
    ``order`` draws each epoch's data order; ``epoch`` is the last completed epoch and
    ``record`` its metrics record; ``start`` is the ``time.perf_counter()`` reading training
    would have started at without interruption (elapsed seconds = now - start);
    ``precision`` is ``train.precision`` on the run's device (:mod:`ncpvae.run.precision`)."""

    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    order: torch.Generator
    epoch: int = 0
    step: int = 0
    images_seen: int = 0
    start: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)
    precision: Precision = field(default_factory=lambda: Precision("fp32", torch.device("cpu")))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


#: ``callback(run, state)`` after each epoch (``state.record`` holds the epoch's record)
EpochCallback = Callable[[Run, TrainState], None]


def start_training(run: Run) -> TrainState:
    """Check the sizes and make the optimizer and the data-order generator; for a run resumed
    inside this stage (``run.resume_from``), put back its optimizer, generator and RNG states,
    counters and last record, so training continues bit for bit."""
    cfg = run.config.train
    model, prior = run.model, run.prior.base_prior
    if len(run.data.train) < 1:
        raise ConfigError("the training set is empty")
    dist = run.dist  # under torchrun: DDP, each rank a contiguous shard of every global batch
    if dist.active and cfg.batch_size < 2 * dist.world_size:
        raise ConfigError(f"train.batch_size ({cfg.batch_size}) is the global batch, split over "
                          f"{dist.world_size} processes; use at least {2 * dist.world_size}")
    params = list(model.parameters()) + [p for p in prior.parameters() if p.requires_grad]
    state = TrainState(adam(params, lr=cfg.lr, fused=cfg.fused_adam), params,
                       torch.Generator().manual_seed(run.config.seed),
                       precision=Precision(cfg.precision, torch.device(run.device)))
    saved = run.resume_from
    elapsed_before = 0.0
    if saved is not None and saved.get("stage") == "vae":  # continue an interrupted training
        state.optimizer.load_state_dict(saved["optimizer"])
        state.precision.load_state_dict(saved.get("grad_scaler"))
        rng.restore(saved["rng"], {"order": state.order},
                    what=f"checkpoint '{run.directory.checkpoint if run.directory else ''}'")
        state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
        state.images_seen = int(saved.get("images_seen", 0))
        elapsed_before = float(saved.get("elapsed_seconds", 0.0))
        state.record = dict(saved.get("record", {}))
    state.start = time.perf_counter() - elapsed_before
    return state


def train_epoch(run: Run, state: TrainState, loss_fn: Callable[[Tensor, int], dict[str, Tensor]],
                epoch: int) -> dict[str, Any]:
    """Epoch ``epoch``: one optimizer step per batch of the data order; return the epoch's
    record (train means, the test-set terms of :func:`evaluate_vae`, throughput). Raises
    :class:`NonFiniteError` before the epoch ends if a loss was not finite."""
    cfg = run.config.train
    dist = run.dist
    sums: dict[str, Tensor] = {}
    batches = _batches(len(run.data.train), cfg.batch_size, state.order, cfg.steps_per_epoch)
    step_bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="step", disable=run.quiet)
    epoch_start = time.perf_counter()
    shards: list[Tensor] = []
    flags: list[Tensor] = []  # isfinite(loss) of the steps not yet read, on the device
    for batch_number, batch in enumerate(step_bar, start=1):
        index = dist.shard(batch)
        shards.append(index)
        x = run.data.train.get_batch(index).to(run.device, non_blocking=True)
        with dist.sharded(len(batch)), state.precision.autocast():
            out = loss_fn(x, state.step)
        out = state.precision.to_fp32(out)  # losses and KL summed in float32
        loss = out["loss"]
        # checked on the device; read every FINITE_CHECK_INTERVAL steps and at the epoch's
        # end (a non-finite step's updates are never checkpointed: see _check_finite)
        flags.append(torch.isfinite(loss.detach()))
        state.optimizer.zero_grad(set_to_none=True)
        weight = distributed.loss_weight(dist, len(index), len(batch))
        state.precision.backward(loss if weight == 1.0 else loss * weight)
        state.precision.step(state.optimizer, state.params, cfg.grad_clip)
        state.step += 1
        state.images_seen += len(batch)
        share = len(index) / len(batch) if dist.active else None
        for key, value in out.items():
            if value.ndim == 0:
                value = value.detach() if share is None else value.detach() * share
                sums[key] = sums.get(key, 0.0) + value
        if batch_number % FINITE_CHECK_INTERVAL == 0:
            _check_finite(flags, batch_number, epoch, state.step, dist)
            if not run.quiet:
                step_bar.set_postfix(loss=f"{float(loss.detach()):.1f}")
    _check_finite(flags, len(batches), epoch, state.step, dist)
    distributed.log_shard(dist, epoch, torch.cat(shards) if shards else torch.zeros(0))
    if dist.active:  # the global batch means, summed over the epoch's steps
        sums = dist.all_reduce_sums(sums)
    epoch_time = time.perf_counter() - epoch_start
    return {"stage": "train", "epoch": epoch, "step": state.step,
            **{f"train_{k}": float(v) / len(batches) for k, v in sums.items()},
            **evaluate_vae(run, cfg.eval_size, step=state.step),
            "images_per_second": len(batches) * cfg.batch_size / epoch_time,
            "elapsed_seconds": state.elapsed()}


def log_epoch(run: Run, state: TrainState) -> None:
    """Append the epoch's record to metrics.jsonl."""
    run.log(state.record)


def save_epoch_checkpoint(run: Run, state: TrainState) -> None:
    """The epoch's checkpoint (the writing process only): weights, optimizer, counters, the
    data-order generator and every global RNG state (:mod:`ncpvae.run.rng`), the metrics
    length; then the ``epoch`` boundary of :mod:`ncpvae.run.hooks`."""
    if not run.is_writer:
        return
    scaler = state.precision.state_dict()  # fp16's gradient scaler (none otherwise)
    run.checkpoints.write(run.model, run.prior, "vae", epoch=state.epoch, step=state.step,
                          optimizer=state.optimizer.state_dict(),
                          world_size=run.dist.world_size,
                          rng=rng.capture({"order": state.order}),
                          images_seen=state.images_seen, record=to_plain_json(state.record),
                          elapsed_seconds=state.elapsed(),
                          metrics_lines=progress.metrics_lines(run.directory), completed=[],
                          **({} if scaler is None else {"grad_scaler": scaler}))
    hooks.boundary("epoch")


#: what runs after every epoch, in order: the record, then the checkpoint
EPOCH_CALLBACKS: tuple[EpochCallback, ...] = (log_epoch, save_epoch_checkpoint)


def train_epochs(run: Run, state: TrainState, *,
                 callbacks: Sequence[EpochCallback] = EPOCH_CALLBACKS) -> None:
    """Train from the epoch after ``state.epoch`` to ``train.epochs``; after each epoch, call
    every callback (``state.record`` then holds the epoch's record)."""
    loss_fn = distributed.loss_function(run.dist, run.model, run.prior.base_prior,
                                        run.objective)
    epochs = run.config.train.epochs
    epoch_bar = tqdm(range(state.epoch + 1, epochs + 1), desc="train VAE", unit="epoch",
                     disable=run.quiet, initial=state.epoch, total=epochs)
    run.model.train()
    for epoch in epoch_bar:
        state.record = train_epoch(run, state, loss_fn, epoch)
        state.epoch = epoch
        for callback in callbacks:
            callback(run, state)
        epoch_bar.set_postfix(elbo=f"{state.record.get('test_elbo', float('nan')):.1f}",
                              active=state.record["active_units"])


def training_summary(state: TrainState) -> dict[str, Any]:
    """The ``vae`` section of summary.json: the last epoch's record, the training time and the
    images seen."""
    summary = {key: value for key, value in state.record.items() if key not in ("stage",)}
    summary["train_seconds"] = state.elapsed()
    summary["images_seen"] = state.images_seen
    return summary


def write_vae_outputs(run: Run, summary: dict[str, Any]) -> None:
    """The ``vae`` section of summary.json and the training plots (the writing process)."""
    assert run.directory is not None
    run.directory.update_summary("vae", summary)
    vae_plots(run, summary.get("kl_per_dim"))


def train_vae(run: Run) -> dict[str, Any]:
    """Stage 1: optimize the objective; log the record and checkpoint (atomically) after every
    epoch; then the summary and the plots.

    Each epoch's checkpoint holds the model, prior, optimizer, epoch, step, the data-order
    generator and the global RNG states (:mod:`ncpvae.run.rng`), so a run resumed from it
    (``run.resume_from``) continues bit for bit as if it had never stopped."""
    state = start_training(run)
    train_epochs(run, state)
    summary = training_summary(state)
    if run.is_writer:
        write_vae_outputs(run, summary)
    return summary


def vae_plots(run: Run, kl_per_dim: list[float] | None) -> None:
    """Training curves, reconstructions, KL per dim and traversals."""
    assert run.directory is not None
    directory = run.directory
    plots.plot_training_curves(directory.records("train"),
                               directory.plot(files.PLOT_TRAINING_CURVES))
    model = run.model
    with eval_mode(model), torch.no_grad():
        # 16 test images spread evenly over the test set (a sorted set shows every class)
        n_test = len(run.data.test)
        spread = torch.linspace(0, n_test - 1, min(16, n_test)).round().long()
        x = run.data.test.get_batch(spread).to(run.device)
        mu, _ = model.encode(x)
        plots.plot_reconstructions(x, model.mean_image(model.decode(mu)),
                                   directory.plot(files.PLOT_RECONSTRUCTIONS))
        if kl_per_dim is not None:
            kl = torch.tensor(kl_per_dim)
        else:  # no closed-form KL: rank dims by posterior-mean variance instead
            kl = encode_source(model, run.data.test, run.device, limit=1000)[0].var(0).cpu()
        plots.plot_kl_per_dim(kl, directory.plot(files.PLOT_KL_PER_DIM),
                              getattr(model, "group_sizes", None))
        plots.plot_traversals(model, mu[0], kl, directory.plot(files.PLOT_TRAVERSALS))
